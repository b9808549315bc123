-- errors.lua: structured error values (SPEC §5).
-- Contract: run once per Lua state by the host, in the trusted global environment.
-- Returns a table `M` with:
--   M.new(message | {message, kind, retryable, details}) -> error value
--   M.wrap(err, message), M.is(err, kind), M.is_error(v), M.fields(err)
--   M.public() -> a fresh copy of the user-facing `errors` table (one per sandbox)
-- An error value is an empty table whose metatable is locked (__metatable), with its data
-- kept in a weak table, so sandboxed code can read it only through its methods.
local setmetatable, type, tostring, pairs, rawequal = setmetatable, type, tostring, pairs, rawequal

local KINDS = {
    NOT_FOUND = "NotFound", ALREADY_EXISTS = "AlreadyExists", INVALID = "Invalid",
    PERMISSION_DENIED = "PermissionDenied", UNAVAILABLE = "Unavailable", INTERNAL = "Internal",
    CANCELED = "Canceled", CONFLICT = "Conflict", TIMEOUT = "Timeout",
    RATE_LIMITED = "RateLimited", UNKNOWN = "Unknown",
}
local VALID_KIND = {}
for _, v in pairs(KINDS) do VALID_KIND[v] = true end
local RETRYABLE_BY_DEFAULT = { Unavailable = true, Timeout = true, RateLimited = true }

local data = setmetatable({}, { __mode = "k" })
local methods = {}
local meta = {
    __index = methods,
    __metatable = "error",
    __tostring = function(e) return data[e].message end,
    __newindex = function() error("error values are read-only", 2) end,
}

local function copy(t)
    if type(t) ~= "table" then return t end
    local out = {}
    for k, v in pairs(t) do out[k] = v end
    return out
end

local function make(message, kind, retryable, details)
    local e = setmetatable({}, meta)
    data[e] = { message = message, kind = kind, retryable = retryable, details = details }
    return e
end

local function check_self(e, name)
    local d = data[e]
    if d == nil then error("bad argument #1 to '" .. name .. "' (error value expected)", 3) end
    return d
end

function methods.kind(e) return check_self(e, "kind").kind end
function methods.message(e) return check_self(e, "message").message end
function methods.retryable(e) return check_self(e, "retryable").retryable end
function methods.details(e) return copy(check_self(e, "details").details) end

local M = { KINDS = KINDS }

function M.is_error(v) return type(v) == "table" and data[v] ~= nil end

function M.new(spec, kind, retryable, details)
    if type(spec) == "table" and data[spec] == nil then
        local message = spec.message
        if message == nil then message = "error" end
        kind, retryable, details = spec.kind, spec.retryable, spec.details
        spec = tostring(message)
    elseif M.is_error(spec) then
        return spec
    elseif type(spec) ~= "string" then
        if type(spec) == "number" then
            spec = tostring(spec)
        else
            error("bad argument #1 to 'new' (string or table expected, got " .. type(spec) .. ")", 2)
        end
    end
    if kind == nil or not VALID_KIND[kind] then kind = KINDS.UNKNOWN end
    if retryable == nil then retryable = RETRYABLE_BY_DEFAULT[kind] or false end
    if details ~= nil and type(details) ~= "table" then details = { value = details } end
    return make(spec, kind, retryable and true or false, copy(details))
end

function M.wrap(err, message)
    if message == nil then return M.new(err) end
    message = tostring(message)
    local d = data[err]
    if d == nil then
        if err == nil then return nil end
        return make(message .. ": " .. tostring(err), KINDS.UNKNOWN, false, nil)
    end
    return make(message .. ": " .. d.message, d.kind, d.retryable, copy(d.details))
end

function M.is(err, kind)
    local d = data[err]
    return d ~= nil and d.kind == kind
end

-- Read-only view for the host (conversion to Python, logging).
function M.fields(err)
    local d = data[err]
    if d == nil then return nil end
    return d.message, d.kind, d.retryable, d.details
end

function M.public()
    local t = { new = M.new, wrap = M.wrap, is = M.is }
    for k, v in pairs(KINDS) do t[k] = v end
    return t
end

return M
