-- validate.lua: stage 1. Receives an order {order_id, items}; orders without items are
-- poison (returned as errors until dead-lettered); good orders go on to shop:fulfilment.
local json = require("json")
local queue = require("queue")
local logger = require("logger")

return function(body)
    local order = json.decode(body)
    if type(order.items) ~= "table" or #order.items == 0 then
        return nil, errors.new({ message = "order " .. tostring(order.order_id) .. " has no items",
                                 kind = errors.INVALID })
    end
    local total = 0
    for _, item in ipairs(order.items) do total = total + item.qty end
    local ok, err = queue.publish("fulfilment", { order_id = order.order_id, units = total })
    if not ok then return nil, err end
    logger.debug("validated", { order_id = order.order_id })
    return true
end
