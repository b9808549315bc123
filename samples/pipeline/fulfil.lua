-- fulfil.lua: stage 2. Receives {order_id, units} (msgpack-encoded) and acknowledges it
-- itself through the message object, logging the attempt.
local queue = require("queue")
local logger = require("logger")

return function(order)
    local msg = queue.message()
    logger.info("fulfilled", { order_id = order.order_id, units = order.units, attempt = msg:attempt() })
    msg:ack()
end
