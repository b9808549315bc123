-- task_handler.lua: the seed's handler, unmodified, with `process_task` defined above it.
-- Contract: receives one task body ({id, action, data}); returns a result (ack) or
-- nil and an error (nack: the message is requeued).

local function process_task(data)
    if type(data) ~= "table" or data.id == nil then
        return nil, errors.new({ message = "task has no id", kind = errors.INVALID })
    end
    if data.action == "fail" then
        return nil, errors.new({ message = "task " .. tostring(data.id) .. " asked to fail", kind = errors.INTERNAL })
    end
    return { id = data.id, action = data.action, status = "done" }
end

local json = require("json")
local logger = require("logger")

local function handler(body)
    local data = json.decode(body)

    logger.info("Processing", {task_id = data.id})

    local result, err = process_task(data)
    if err then
        return nil, err  -- Nack: requeue message
    end

    return result  -- Ack: remove from queue
end

return handler
