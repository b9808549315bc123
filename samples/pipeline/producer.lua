-- producer.lua: process.lua `main(count)` publishing `count` orders to shop:orders.
-- Every 10th order has no items (validate rejects it until it is dead-lettered).
local queue = require("queue")
local logger = require("logger")

local function main(count)
    count = tonumber(count) or 50
    for i = 1, count do
        local items = {}
        if i % 10 ~= 0 then
            items = { { sku = "sku-" .. (i % 7), qty = 1 + i % 3 } }
        end
        local ok, err = queue.publish("orders", { order_id = i, items = items })
        if not ok then
            return nil, err
        end
    end
    logger.info("published orders", { count = count })
    return count
end

return { main = main }
