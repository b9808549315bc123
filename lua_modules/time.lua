-- time.lua: the `time` module (SPEC §5): time.sleep(d) and time.now().
-- Contract: run once per Lua state by the host with (bridge, errors, state); returns
-- `new() -> module`. sleep takes seconds (a number) or a duration string ("250ms",
-- "1m30s"); it returns true, or nil and an error (Canceled when the worker is stopping).
-- Under a time limit (state.deadline), a sleep past the deadline is cut short and raises
-- the Timeout error.
local bridge, errors, state = ...
local type, tonumber, pcall, find, sub = type, tonumber, pcall, string.find, string.sub
local UNITS = { ns = 1e-9, us = 1e-6, ["µs"] = 1e-6, ms = 1e-3, s = 1, m = 60, h = 3600 }

local function parse_duration(s)
    local n = tonumber(s)
    if n then return n end
    local total, pos, len = 0, 1, #s
    if len == 0 then return nil end
    while pos <= len do
        local a, b, num, unit = find(s, "^(%d+%.?%d*)([a-zµ]+)", pos)
        if not a or not UNITS[unit] then return nil end
        total = total + tonumber(num) * UNITS[unit]
        pos = b + 1
    end
    return total
end

local function host_error(kind, message)
    return nil, errors.new({ message = message, kind = kind })
end

local function new()
    local M = {}
    function M.sleep(d)
        local seconds
        if type(d) == "number" then
            seconds = d
        elseif type(d) == "string" then
            seconds = parse_duration(d)
            if seconds == nil then
                return host_error("Invalid", "time.sleep: '" .. d .. "' is not a duration (use e.g. '250ms', '2s')")
            end
        else
            error("bad argument #1 to 'sleep' (number or duration string expected, got " .. type(d) .. ")", 2)
        end
        if seconds ~= seconds or seconds < 0 then
            return host_error("Invalid", "time.sleep: the duration must be a non-negative number")
        end
        local deadline, cut = state.deadline, false
        if deadline ~= nil then
            local remaining = deadline - state.clock()
            if seconds >= remaining then seconds, cut = math.max(remaining, 0), true end
        end
        local ok, res, kind, msg = pcall(bridge.sleep, seconds)
        if cut and res then error(state.timeout_error(), 2) end
        if not ok then return host_error("Internal", "time.sleep failed") end
        if res then return true end
        return host_error(kind, msg)
    end
    function M.now()
        return bridge.now()
    end
    return M
end

return { new = new, parse_duration = parse_duration }
