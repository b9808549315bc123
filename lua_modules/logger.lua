-- logger.lua: the `logger` module (SPEC §5).
-- Contract: run once per Lua state by the host with (bridge, json, errors, state); returns
-- `new(entry_id) -> logger`. A logger has debug/info/warn/error(msg, fields?), callable
-- as logger.info(...) and logger:info(...), plus :with(fields) and :named(name) children.
-- Records go to the host through bridge.log(level, entry_id, name, src, line, msg, fields_json),
-- with the calling Lua file and line; fields are encoded leniently (a log call never fails).
local bridge, json, _, state = ...
local type, tostring, pairs, select, pcall, next = type, tostring, pairs, select, pcall, next
local getinfo = debug.getinfo
local concat = table.concat
local clean = json.utf8_clean
local LEVELS = { debug = 10, info = 20, warn = 30, error = 40 }

local function merge(a, b)
    if b == nil or type(b) ~= "table" then return a end
    local out = {}
    if a then for k, v in pairs(a) do out[k] = v end end
    for k, v in pairs(b) do out[k] = v end
    return out
end

-- Whether a level is enabled is asked of the host once and then re-asked every
-- RECHECK_EVERY log calls, so a filtered-out log call costs no call into Python (which
-- would take the GIL on every message). A level change made in Python while the app runs
-- takes effect within that many calls per Lua state.
local RECHECK_EVERY = 1000
local enabled_cache, calls = {}, 0

local function level_enabled(level)
    calls = calls + 1
    if calls >= RECHECK_EVERY then enabled_cache, calls = {}, 0 end
    local enabled = enabled_cache[level]
    if enabled == nil then
        local ok, answer = pcall(bridge.log_enabled, level)
        enabled = ok and answer == true
        enabled_cache[level] = enabled
    end
    return enabled
end

local function emit(level, entry_id, name, base_fields, msg, fields, stack_level)
    if not level_enabled(level) then return end
    local info = getinfo(stack_level, "Sl")
    local line = info and info.currentline or 0
    local src = info and info.short_src or "?"
    local all = merge(base_fields, fields)
    if fields ~= nil and type(fields) ~= "table" then
        all = merge(all, { fields = fields })
    end
    local fields_json = ""
    if all ~= nil and next(all) ~= nil then fields_json = json.encode_lenient(all) end
    local ok_msg, text = pcall(tostring, msg)
    if not ok_msg and state.fatal(text) then error(text, 0) end -- a limit is never swallowed
    if not ok_msg or type(text) ~= "string" then text = "<" .. type(msg) .. ">" end
    pcall(bridge.log, level, entry_id, name and clean(name), clean(src), line, clean(text), fields_json)
end

local new_logger

new_logger = function(entry_id, name, fields)
    local self = {}
    for level_name, level in pairs(LEVELS) do
        self[level_name] = function(a, b, c)
            if a == self then a, b = b, c end -- called as logger:info(...)
            emit(level, entry_id, name, fields, a, b, 3)
        end
    end
    self.with = function(a, b)
        if a == self then a = b end
        return new_logger(entry_id, name, merge(fields, a))
    end
    self.named = function(a, b)
        if a == self then a = b end
        local child = tostring(a)
        return new_logger(entry_id, name and (name .. "." .. child) or child, fields)
    end
    return self
end

-- print(...) logs its arguments, tab-separated, at info level.
local function make_print(entry_id)
    return function(...)
        local n = select("#", ...)
        local parts = {}
        for i = 1, n do parts[i] = tostring((select(i, ...))) end
        emit(LEVELS.info, entry_id, nil, nil, concat(parts, "\t"), nil, 3)
    end
end

return { new = function(entry_id) return new_logger(entry_id, nil, nil) end, print = make_print }
