-- task_handler.lua: Wippy's documented handler shape. A task {id, fail?} is done at once;
-- one with `fail = true` fails every time, is retried after 1 s and 2 s, and after its 3rd
-- attempt lands in app:tasks_dlq with the reason in x_dead_letter_reason.
local queue = require("queue")
local logger = require("logger")

local function process_task(task)
    if task.fail then
        return nil, "task " .. tostring(task.id) .. " cannot be done"
    end
    return true
end

local function main(body)
    local msg = queue.message()
    local ok, err = process_task(body)
    if err then
        logger:warn("task failed", { id = msg:id(), attempt = msg:attempt(), error = err })
        return false  -- nack: retried after the queue's retry delay
    end
    if body.id % 50 == 0 then
        logger:info("processing", { id = msg:id(), correlation_id = msg:header("correlation_id") })
    end
    return true       -- ack: deleted from the queue
end

return { main = main }
