-- queue.lua: the `queue` module (SPEC §5): publish, message, info.
-- Contract: run once per Lua state by the host with (bridge, json, errors, state); returns
-- `new(entry_id) -> module`. Arguments are checked here: a wrong argument type raises,
-- every other failure is returned as (nil, err). The body is encoded here, strictly, in
-- the queue's codec (asked of the host once per queue): a value that cannot travel
-- unchanged is refused with Invalid, and with msgpack every Lua string crosses byte for
-- byte. `options.delay` (seconds or a duration string) is checked by the host. `state.current` describes the delivery of the
-- handler call running now (set by sandbox.lua's host.deliver; nil elsewhere), and
-- queue.message() wraps it in a Message object with id/header/headers/body/body_json/
-- attempt/ack/nack. Settling is single-shot and every method fails once the handler returned.
local bridge, json, errors, state = ...
local type, tostring, pairs, pcall, next, sub = type, tostring, pairs, pcall, next, string.sub
local setmetatable = setmetatable
local new_message
local clean = json.utf8_clean

local function fail(kind, message)
    return nil, errors.new({ message = message, kind = kind })
end

local function check_headers(headers)
    if headers == nil then return "" end
    if type(headers) ~= "table" or errors.is_error(headers) then
        error("bad argument #3 to 'publish' (table of headers expected, got " .. type(headers) .. ")", 3)
    end
    local clean_headers = {}
    for k, v in pairs(headers) do
        if type(k) ~= "string" then
            return nil, "header names must be strings (got a " .. type(k) .. ")"
        end
        local prefix = sub(k, 1, 2)
        if prefix == "x_" or prefix == "X_" then -- X_attempts too
            return nil, "header '" .. k .. "' is reserved: names starting with 'x_' belong to the runtime"
        end
        local tv = type(v)
        if tv ~= "string" and tv ~= "number" and tv ~= "boolean" then
            return nil, "header '" .. k .. "' must be a string, number or boolean (got a " .. tv .. ")"
        end
        if tv == "number" and (v ~= v or v == math.huge or v == -math.huge) then
            return nil, "header '" .. k .. "' must be a finite number"
        end
        clean_headers[k] = v
    end
    if next(clean_headers) == nil then return "" end
    local encoded, err = json.encode_strict(clean_headers)
    if not encoded then return nil, err:message() end
    return encoded
end

local function call_host(fn, ...)
    local ok, res, kind, msg = pcall(fn, ...)
    if not ok then return fail("Internal", "the host failed to answer") end
    if res == nil then return fail(kind or "Internal", msg or "unknown error") end
    return res
end

local MESSAGE_META = { __metatable = "message" }

-- A Message object over one delivery descriptor `cur` (see host.deliver in sandbox.lua).
new_message = function(cur)
    local msg = setmetatable({}, MESSAGE_META)
    local function live()
        if cur.released then return fail("Invalid", "message released: its handler has returned") end
        return true
    end
    local function settle(action)
        local ok, err = live()
        if not ok then return nil, err end
        if cur.settled then return fail("Invalid", "message already settled (" .. cur.settled .. ")") end
        local res, herr = call_host(bridge.settle, action, cur.index)
        if res == nil then return nil, herr end
        cur.settled = action
        return true
    end
    function msg:id()
        local ok, err = live()
        if not ok then return nil, err end
        if cur.id == nil then
            local id, herr = call_host(bridge.message_id, cur.index)
            if id == nil then return nil, herr end
            cur.id = id
        end
        return cur.id
    end
    function msg:attempt() local ok, err = live() if not ok then return nil, err end return cur.attempt end
    function msg:body() local ok, err = live() if not ok then return nil, err end return cur.body end
    function msg:body_json() local ok, err = live() if not ok then return nil, err end return cur.value end
    function msg:headers()
        local ok, err = live()
        if not ok then return nil, err end
        if cur.headers == nil then
            local text, herr = call_host(bridge.message_headers, cur.index)
            if text == nil then return nil, herr end
            local decoded, derr = json.decode(text)
            if type(decoded) ~= "table" then return nil, derr or fail("Internal", "unreadable headers") end
            cur.headers = decoded
        end
        local copy = {}
        for k, v in pairs(cur.headers) do copy[k] = v end
        return copy
    end
    function msg:header(name)
        local headers, err = msg:headers()
        if headers == nil then return nil, err end
        return headers[name]
    end
    function msg:ack() return settle("ack") end
    function msg:nack() return settle("nack") end
    return msg
end

local function new(entry_id)
    local M = {}

    local codecs = {} -- queue ID -> codec name, asked of the host once per queue

    function M.publish(queue_id, data, headers, options)
        if type(queue_id) ~= "string" then
            error("bad argument #1 to 'publish' (queue ID string expected, got " .. type(queue_id) .. ")", 2)
        end
        if options ~= nil and type(options) ~= "table" then
            error("bad argument #4 to 'publish' (table of options expected, got " .. type(options) .. ")", 2)
        end
        local delay = options and options.delay
        if delay ~= nil and type(delay) ~= "string" and type(delay) ~= "number" then
            return fail("Invalid", "queue.publish: options.delay must be a duration string or a number of seconds")
        end
        if type(delay) == "string" then delay = clean(delay) end
        local headers_json, herr = check_headers(headers)
        if headers_json == nil then return fail("Invalid", "queue.publish: " .. herr) end
        queue_id = clean(queue_id)
        local codec = codecs[queue_id]
        if codec == nil then
            local cerr
            codec, cerr = call_host(bridge.queue_codec, entry_id, queue_id)
            if codec == nil then return nil, cerr end
            codecs[queue_id] = codec
        end
        local body, err
        if codec == "application/msgpack" then
            body, err = json.encode_msgpack(data)
        else
            body, err = json.encode_strict(data)
        end
        if body == nil then
            return fail("Invalid", "queue.publish: " .. err:message():gsub("^json%.encode: ", ""):gsub("^msgpack%.encode: ", ""))
        end
        return call_host(bridge.publish, entry_id, queue_id, body, headers_json, delay)
    end

    function M.message()
        local cur = state.current
        if cur == nil then
            return fail("Invalid", "queue.message() is only available inside a consumer handler")
        end
        if cur.object == nil then cur.object = new_message(cur) end
        return cur.object
    end

    function M.info(queue_id)
        if type(queue_id) ~= "string" then
            error("bad argument #1 to 'info' (queue ID string expected, got " .. type(queue_id) .. ")", 2)
        end
        local text, err = call_host(bridge.queue_info, entry_id, clean(queue_id))
        if text == nil then return nil, err end
        return json.decode(text)
    end

    return M
end

return { new = new }
