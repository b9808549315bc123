-- sandbox.lua: builds sandboxed environments and runs entries in one Lua state (SPEC §4).
-- Contract: run once per Lua state by the host, in the trusted global environment, with
-- (bridge, mods): mods holds the loaded module factories (errors, json, logger, queue,
-- time), `state` (per-state data shared with the modules, e.g. the current message),
-- `clock` and `limited`. Returns `host`, the only table the Python side calls:
--   host.load(id, kind, text, chunkname, modules, imports, method, timeout) -> true | nil, msg, tb
--   host.call(id, timeout, ...) -> true, n, exported | false, msg, tb, kind
--   host.export(...) -> n, exported   (values made safe for Python: see export below)
--   host.compile(text, chunkname) -> true | nil, msg   (syntax check, never runs code)
--   host.deliverer(id) -> deliver(body, value, has_value, attempt, timeout) -> status, msg, tb, kind
--       (hands one message to the entry's handler; see DELIVERY below)
--   host.batch_deliverer(id, ctl, durs) -> deliver_batch(timeout, timed, n, body1, attempt1, ...)
--       (several messages in one call, LuaJIT only; see BATCHES below)
-- Time limits (see LIMITS below): `timeout` seconds of wall clock per call, enforced by a
-- count hook that keeps raising a Timeout error once the deadline has passed. The host
-- keeps the JIT off for the user's code in states that run limited code (hooks do not fire in
-- compiled traces); the runtime's own modules (the JSON decoder, ...) are still compiled.
-- Runs on LuaJIT 2.1 and on Lua 5.4 (used for entries with a memory limit).
-- The sandbox is built by absence: a fresh environment table per entry holding only what
-- SPEC §4 lists. Sandboxed code never sees the real globals, this table, or the bridge.
local bridge, mods = ...
local errors, json = mods.errors, mods.json
local type, pairs, next, tostring, select, error = type, pairs, next, tostring, select, error
local load, xpcall, pcall, setmetatable, rawget = load, xpcall, pcall, setmetatable, rawget
local unpack = table.unpack or unpack
local traceback, getinfo, sethook = debug.traceback, debug.getinfo, debug.sethook
local co_create, co_resume = coroutine.create, coroutine.resume
local format, find, byte = string.format, string.find, string.byte

-- Lock the shared pieces every state has before any user code runs.
string.dump = nil
getmetatable("").__metatable = false
python = nil
if package and package.loaded then package.loaded.python = nil end

---------------------------------------------------------------------------------------------
-- C STACK. Lua code re-enters Lua through C in a few places (LuaJIT: string.gsub with a
-- function or table replacement, string.format's __tostring, table.sort's comparator and
-- __lt, os.time's table fields, coroutine.resume/wrap, an xpcall message handler). Each such
-- level costs C stack (up to ~9 KiB for gsub) and LuaJIT does not bound it: enough of them
-- crash the process with SIGSEGV. Every such path goes through `guard`, which counts the
-- levels in this state and raises a "C stack overflow" error past MAX_C_DEPTH, so the C stack
-- stays below ~2 MiB whatever the thread (the host also gives worker threads large stacks as a
-- margin). Lua 5.4 has its own limit (LUAI_MAXCCALLS); the guard applies there too.
-- The count is exact: no yield can cross these C functions (a coroutine's yield returns from
-- its resume, which restores the count), errors are caught and re-raised after restoring it,
-- and every call from the host starts again from 0.
local MAX_C_DEPTH = 160
local cdepth = 0

local function c_overflow(name)
    error("C stack overflow: more than " .. MAX_C_DEPTH .. " nested calls through C functions (" .. name .. ")", 3)
end

local function leave_guard(saved, ok, ...)
    cdepth = saved
    if not ok then error((...), 0) end
    return ...
end

local function guard(name, fn)
    return function(...)
        local saved = cdepth
        if saved >= MAX_C_DEPTH then c_overflow(name) end
        cdepth = saved + 1
        return leave_guard(saved, pcall(fn, ...))
    end
end

do
    -- On the shared string table itself: ("x"):gsub(...) reaches it through the string metatable.
    local real_gsub, real_format = string.gsub, string.format
    local guarded_gsub, guarded_format = guard("string.gsub", real_gsub), guard("string.format", real_format)
    string.gsub = function(s, p, r, n)
        local tr = type(r)
        if tr == "function" or tr == "table" then return guarded_gsub(s, p, r, n) end
        return real_gsub(s, p, r, n)
    end
    string.format = function(fmt, ...)
        for i = 1, select("#", ...) do
            local t = type((select(i, ...)))
            if t == "table" or t == "userdata" then return guarded_format(fmt, ...) end
        end
        return real_format(fmt, ...)
    end
    table.sort = guard("table.sort", table.sort)
end

local BASE = { "assert", "error", "ipairs", "next", "pairs", "pcall", "xpcall", "select",
               "tonumber", "tostring", "type", "unpack", "rawequal", "rawget", "rawset",
               "setmetatable", "getmetatable" }
local COPIED = { string = string, table = table, math = math, coroutine = coroutine }
local OS_ALLOWED = { "time", "date", "clock", "difftime" }
local real = {}
for _, name in ipairs(BASE) do real[name] = _G[name] end
real.unpack = unpack

---------------------------------------------------------------------------------------------
-- LIMITS. One deadline per state (a state runs one call at a time). The hook is installed
-- on the main thread for the call and on every coroutine the sandbox creates meanwhile.
local HOOK_COUNT = 10000 -- about 10-50 µs of interpreted code between deadline checks
local state = mods.state
local clock = mods.clock
local deadline, limit, timed_out_at = nil, nil, nil

local function timeout_error()
    local where = timed_out_at and (" at " .. timed_out_at) or ""
    return errors.new({ message = "exceeded its time limit of " .. limit .. "s" .. where, kind = "Timeout" })
end

local function hook()
    if deadline ~= nil and clock() > deadline then
        if timed_out_at == nil then
            local info = getinfo(2, "Sl")
            timed_out_at = info and (info.short_src .. ":" .. tostring(info.currentline)) or "?"
        end
        error(timeout_error(), 0)
    end
end

local function arm(timeout)
    if timeout == nil then return end
    limit, timed_out_at = timeout, nil
    deadline = clock() + timeout
    state.deadline = deadline
    sethook(hook, "", HOOK_COUNT)
end

-- Returns the Timeout error if the call ran past its deadline.
local function disarm()
    if deadline == nil then return nil end
    sethook()
    local over = clock() > deadline
    deadline, state.deadline = nil, nil
    if over then return timeout_error() end
    return nil
end

local function past_deadline() return deadline ~= nil and clock() > deadline end

state.timeout_error = function() timed_out_at = timed_out_at or "time.sleep" return timeout_error() end

-- Coroutines get the hook too, so a coroutine cannot outrun the limit.
local function sandbox_create(f)
    local co = co_create(f)
    if deadline ~= nil then sethook(co, hook, "", HOOK_COUNT) end
    return co
end

local function pack(...) return { n = select("#", ...), ... } end

-- A resume is a C re-entry (see C STACK): counted like the other guarded calls. It never
-- raises for an error inside the coroutine, so the count is restored on every return.
local function leave_resume(saved, ...)
    cdepth = saved
    if not (...) and past_deadline() then error(timeout_error(), 0) end
    return ...
end

-- The count at which each coroutine was last resumed: code that can yield while counted (an
-- xpcall handler) restores the count relative to its coroutine's base, which a later resume
-- from elsewhere has moved.
local co_base = setmetatable({}, { __mode = "k" })
local co_running = coroutine.running

local function sandbox_resume(co, ...)
    if type(co) ~= "thread" then return co_resume(co, ...) end -- raises the usual argument error
    local saved = cdepth
    if saved >= MAX_C_DEPTH then c_overflow("coroutine.resume") end
    cdepth = saved + 1
    co_base[co] = saved + 1
    return leave_resume(saved, co_resume(co, ...))
end

local function leave_wrapped(ok, ...)
    if not ok then error((...), 0) end
    return ...
end

local function sandbox_wrap(f)
    local co = sandbox_create(f)
    return function(...)
        local saved = cdepth
        if saved >= MAX_C_DEPTH then c_overflow("coroutine.wrap") end
        cdepth = saved + 1
        co_base[co] = saved + 1
        return leave_wrapped(leave_resume(saved, co_resume(co, ...)))
    end
end

-- Under a time limit pcall cannot swallow the Timeout: once the deadline has passed, a
-- failed protected call raises it again outside the pcall.

local function limited_pcall(f, ...)
    local r = pack(pcall(f, ...))
    if not r[1] and past_deadline() then error(timeout_error(), 0) end
    return unpack(r, 1, r.n)
end

-- xpcall's message handler: LuaJIT calls it from C while unwinding (a C re-entry, and a place
-- where hooks do not fire). The sandbox's xpcall runs it after unwinding instead, as a plain
-- Lua call.
-- Handlers that fail into handlers nest like the guarded calls, so they are counted too. An
-- error in the handler is xpcall's result (as "error in error handling" is), unless it is a limit.
-- A handler may yield (its coroutine resumed later from another depth), so the count is
-- restored relative to the coroutine's base, never to a saved absolute value.
local function leave_handler(co, rel, ok, ...)
    cdepth = (co_base[co] or 0) + rel
    if not ok and past_deadline() then error(timeout_error(), 0) end
    return ...
end

local function finish_xpcall(handler, ok, ...)
    if ok then return ok, ... end
    if cdepth >= MAX_C_DEPTH then c_overflow("xpcall") end
    local co = co_running()
    local rel = cdepth - (co_base[co] or 0)
    cdepth = cdepth + 1
    return false, leave_handler(co, rel, pcall(handler, (...)))
end

local function sandbox_xpcall(f, handler, ...)
    if type(handler) ~= "function" then
        error("bad argument #2 to 'xpcall' (function expected, got " .. type(handler) .. ")", 2)
    end
    return finish_xpcall(handler, real.pcall(f, ...))
end

local os_time = os.time
local guarded_os_time = guard("os.time", os_time)
local function sandbox_os_time(t)
    if type(t) == "table" then return guarded_os_time(t) end -- reads fields through __index
    if t == nil then return os_time() end
    return os_time(t)
end

-- Lua 5.4 runs __gc finalizers where hooks do not fire: refuse them.
local real_setmetatable = setmetatable
local function sandbox_setmetatable(t, mt)
    if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
        error("__gc metamethods are not allowed", 2)
    end
    return real_setmetatable(t, mt)
end
real.setmetatable = sandbox_setmetatable
if mods.limited then real.pcall = limited_pcall end
real.xpcall = sandbox_xpcall

local function shallow_copy(t)
    local out = {}
    for k, v in pairs(t) do out[k] = v end
    return out
end

local host = { state = state }
local loaded = {}        -- entry id -> { value = chunk result, fn = entry point }

local MODULE_FACTORIES = {
    json = function() return { encode = json.encode, decode = json.decode } end,
    logger = function(id) return mods.logger.new(id) end,
    queue = function(id) return mods.queue.new(id) end,
    time = function() return mods.time.new() end,
}

local function new_env(entry_id, modules, imports)
    local env = {}
    for name, fn in pairs(real) do env[name] = fn end
    for name, t in pairs(COPIED) do env[name] = shallow_copy(t) end
    env.coroutine.create, env.coroutine.wrap = sandbox_create, sandbox_wrap
    env.coroutine.resume = sandbox_resume
    local os_copy = {}
    for _, name in ipairs(OS_ALLOWED) do os_copy[name] = os[name] end
    os_copy.time = sandbox_os_time
    env.os = os_copy
    env.errors = errors.public()
    env.print = mods.logger.print(entry_id)
    env._G = env
    env._VERSION = _VERSION

    local allowed, cache = {}, {}
    for _, name in ipairs(modules) do allowed[name] = true end
    env.require = function(name)
        if type(name) ~= "string" then
            error("bad argument #1 to 'require' (string expected, got " .. type(name) .. ")", 2)
        end
        local cached = cache[name]
        if cached ~= nil then return cached end
        local value
        local lib = imports[name]
        if lib ~= nil then
            local entry = loaded[lib]
            if entry == nil then error("library '" .. lib .. "' is not loaded", 2) end
            value = entry.value
        elseif allowed[name] and MODULE_FACTORIES[name] then
            value = MODULE_FACTORIES[name](entry_id)
        elseif COPIED[name] or name == "os" or name == "errors" then
            value = env[name]
        end
        if value == nil then error("module '" .. name .. "' not found", 2) end
        cache[name] = value
        return value
    end
    return env
end

-- Errors. The xpcall message handler only records the error value and the traceback: it runs
-- where hooks do not fire, so it never runs sandboxed code (an error value's __tostring). The
-- message is made afterwards by `error_info`, under the call's deadline.
local INFO = {} -- private key marking the handler's records
local function on_error(e)
    return { [INFO] = true, e = e, tb = traceback("", 2) }
end

local function safe_tostring(v)
    local ok, s = pcall(tostring, v)
    if ok and type(s) == "string" then return json.utf8_clean(s) end
    return "<" .. type(v) .. ">"
end

local function is_memory_error(e)
    return e == "not enough memory"
end

-- (msg, tb, kind) of a failed xpcall(f, on_error) result. A memory error (Lua 5.4) or an
-- error inside error handling skips the handler and arrives as a bare string.
local function error_info(r)
    if type(r) ~= "table" or rawget(r, INFO) == nil then
        local msg = safe_tostring(r)
        return msg, "", is_memory_error(r) and "Memory" or nil
    end
    local e, kind = r.e, nil
    local msg
    if type(e) == "string" then
        msg = json.utf8_clean(e)
        if is_memory_error(e) then kind = "Memory" end
    else
        msg = safe_tostring(e)
        if msg == "<" .. type(e) .. ">" then msg = "(error value of type " .. type(e) .. ")" end
        if errors.is_error(e) then
            local _
            _, kind = errors.fields(e)
        end
    end
    return msg, json.utf8_clean(r.tb), kind
end

-- Module code may protect its own calls, but must not swallow the limits: `state.fatal(e)`
-- says whether an error caught there must be raised again (past the deadline, out of memory,
-- C stack overflow).
function state.fatal(e)
    if past_deadline() or is_memory_error(e) then return true end
    return type(e) == "string" and find(e, "C stack overflow", 1, true) ~= nil
end

function host.compile(text, chunkname)
    local fn, err = load(text, chunkname, "t")
    if fn then return true end
    return nil, json.utf8_clean(tostring(err))
end

local jit = jit

function host.load(id, kind, text, chunkname, modules, imports, method, timeout)
    local env = new_env(id, modules, imports)
    local chunk, err = load(text, chunkname, "t", env)
    if not chunk then return nil, json.utf8_clean(tostring(err)), "" end
    -- Under a time limit the user's code is never compiled (every function of the chunk,
    -- recursively): the count hook that enforces the limit fires only in the interpreter.
    if mods.limited and jit then jit.off(chunk, true) end
    cdepth = 0
    arm(timeout) -- a limited state limits the chunk's own top-level code too
    local ok, result = xpcall(chunk, on_error)
    local msg, tb
    if not ok then msg, tb = error_info(result) end -- under the deadline
    local over = disarm()
    if over ~= nil then return nil, "its top-level code " .. tostring(over), "" end
    if not ok then return nil, msg, tb end
    local entry = { value = result, env = env }
    if kind ~= "library.lua" then
        local fn
        if type(result) == "function" then
            fn = result
        elseif type(result) == "table" then
            if method == nil then
                return nil, "the chunk returns a table but the entry sets no 'method' to call", ""
            end
            fn = rawget(result, method)
            if type(fn) ~= "function" then
                return nil, format("the table the chunk returns has no function '%s'", method), ""
            end
        elseif method ~= nil and type(rawget(env, method)) == "function" then
            fn = rawget(env, method) -- Wippy style: the method is a global function of the chunk
        else
            return nil, "the chunk must return a function, or a table holding the entry's 'method' (it returned "
                .. type(result) .. ")", ""
        end
        entry.fn = fn
    end
    loaded[id] = entry
    return true
end

function host.is_loaded(id)
    return loaded[id] ~= nil
end

---------------------------------------------------------------------------------------------
-- Export: a copy of Lua values that is safe to hand to Python. Strings that are not valid
-- UTF-8 become {["\0bytes"] = s-as-hex}, error values {["\0error"] = {...}}, functions and
-- other opaque values their tostring(), cycles the string "<cycle>". Empty tables carry
-- ["\0object"] = true when they came from decoding `{}`. It may run sandboxed code (a table
-- key's __tostring), so it runs before the deadline is switched off.
local function hex(s)
    return (s:gsub(".", function(c) return format("%02x", c:byte()) end))
end

local MAX_EXPORT_DEPTH = 200

local function export_string(s)
    if find(s, "[\128-\255]") and json.utf8_clean(s) ~= s then return { ["\0bytes"] = hex(s) } end
    return s
end

-- Keys: a user key starting with "\0" gets one more "\0" (Python strips it), so the
-- marker keys above can only come from here. Keys Python cannot hash become strings.
local function export_key(k)
    local tk = type(k)
    if tk == "string" then
        local out = export_string(k)
        if out == k and byte(k, 1) == 0 then out = "\0" .. k end
        return out
    elseif tk == "number" or tk == "boolean" then
        return k
    end
    return safe_tostring(k)
end

local function export_value(v, seen, depth)
    local tv = type(v)
    if tv == "string" then
        return export_string(v)
    elseif tv == "number" or tv == "boolean" or tv == "nil" then
        return v
    elseif tv == "table" then
        if depth > MAX_EXPORT_DEPTH then
            error("the result is nested deeper than " .. MAX_EXPORT_DEPTH .. " levels", 0)
        end
        if errors.is_error(v) then
            local message, kind, retryable, details = errors.fields(v)
            return { ["\0error"] = { message = export_string(message), kind = kind, retryable = retryable,
                                      details = export_value(details, seen, depth + 1) } }
        end
        if seen[v] then return "<cycle>" end
        seen[v] = true
        local out = {}
        for k, val in next, v do
            out[export_key(k)] = export_value(val, seen, depth + 1)
        end
        seen[v] = nil
        if next(out) == nil and json.is_object(v) then out["\0object"] = true end
        return out
    end
    return safe_tostring(v)
end

function host.export(...)
    local n = select("#", ...)
    local out = {}
    for i = 1, n do out[i] = export_value((select(i, ...)), {}, 1) end
    return n, out
end

-- The results of a call, exported while the deadline still holds:
-- true, n, exported | false, msg, tb, kind
local function finish_call(ok, ...)
    if ok then
        local eok, n, out = pcall(host.export, ...)
        if eok then return true, n, out end
        local msg, kind = safe_tostring(n), nil
        if is_memory_error(n) then kind = "Memory" end
        return false, "cannot return the result to Python: " .. msg, "", kind
    end
    local msg, tb, kind = error_info((...))
    return false, msg, tb, kind
end

local function finish_limited_call(...)
    local ok, a, b, c = finish_call(...)
    local over = disarm()
    if over ~= nil then return false, tostring(over), (not ok and b) or "", "Timeout" end
    return ok, a, b, c
end

function host.call(id, timeout, ...)
    local entry = loaded[id]
    if entry == nil or entry.fn == nil then return false, "entry '" .. id .. "' is not loaded", "" end
    cdepth = 0
    if timeout == nil then return finish_call(xpcall(entry.fn, on_error, ...)) end
    arm(timeout)
    return finish_limited_call(xpcall(entry.fn, on_error, ...))
end

---------------------------------------------------------------------------------------------
-- DELIVERY: the per-message hot path. The body arrives as the codec's bytes; JSON is decoded
-- here (no GIL held), other codecs pass the decoded `value` with has_value = true.
-- Status: 0 ack, 1 nack, 2 settled by the handler itself, 3 body could not be decoded.
local ACK, NACK, SETTLED, UNDECODABLE = 0, 1, 2, 3
local json_decode = json.decode
local metered = mods.metered

-- The handler's results as (status, msg, tb, kind), made while the deadline holds: turning
-- an error value into text may run sandboxed code (__tostring).
local function settle_result(cur, ok, r1, r2)
    if not ok then
        local msg, tb, kind = error_info(r1)
        if cur.settled then return SETTLED, msg, tb end
        return NACK, msg, tb, kind
    end
    if cur.settled then return SETTLED end
    if r2 ~= nil then
        local msg = safe_tostring(r2)
        if is_memory_error(r2) then return NACK, msg, "", "Memory" end
        local kind = nil -- an error value's own kind names the failure in the log
        if errors.is_error(r2) then local _, k = errors.fields(r2) kind = k end
        return NACK, msg, "", kind
    end
    if r1 == false then return NACK, "handler returned false", "" end
    return ACK
end

-- One message: (status, msg, tb, kind), status ACK on the hot path with nothing else.
-- `index` is its place in the host's batch (nil for a single delivery): the Message object
-- passes it back to the host when it settles or asks for its id and headers.
local function deliver_one(fn, body, value, has_value, attempt, timeout, index)
    cdepth = 0
    if not has_value then
        local err
        if metered then -- a body too large for the state's room is a memory error of this delivery
            local dok
            dok, value, err = pcall(json_decode, body)
            if not dok then return NACK, safe_tostring(value), "", is_memory_error(value) and "Memory" or nil end
        else
            value, err = json_decode(body)
        end
        if err then return UNDECODABLE, safe_tostring(err), "" end
    end
    local cur = { attempt = attempt, body = body, value = value, index = index }
    state.current = cur
    arm(timeout)
    local ok, r1, r2 = xpcall(fn, on_error, value)
    if ok and r2 == nil and r1 ~= false and not cur.settled then -- the hot path: one value back
        local over = disarm()
        state.current = nil
        cur.released = true
        if over ~= nil then return NACK, tostring(over), "", "Timeout" end
        return ACK
    end
    local rok, status, msg, tb, kind = pcall(settle_result, cur, ok, r1, r2)
    if not rok then
        status, msg, tb, kind = NACK, safe_tostring(status), "", is_memory_error(status) and "Memory" or nil
    end
    local over = disarm()
    state.current = nil
    cur.released = true
    if over ~= nil then return NACK, tostring(over), tb or "", "Timeout" end
    return status, msg, tb, kind
end

function host.deliverer(id)
    local entry = loaded[id]
    if entry == nil or entry.fn == nil then return nil end
    local fn = entry.fn
    return function(body, value, has_value, attempt, timeout)
        return deliver_one(fn, body, value, has_value, attempt, timeout, nil)
    end
end

---------------------------------------------------------------------------------------------
-- BATCHES: the messages already waiting in a worker's buffer, handed over in one call, so
-- the host's per-message work (and the GIL hand-over of a call into Lua) is paid once per
-- batch. Each message still runs alone: its own decode, time limit, state.current and
-- result. The loop stops at the first message whose result is not a plain ack and returns
-- it to the host, which settles it (and replaces this state if it must) before handing
-- over the rest. LuaJIT only: the control block is memory the host owns, read and written
-- through the FFI with no call into Python:
--   ctl[0]  set by the host (from any thread) when the worker stops: no further message starts
--   ctl[1]  the batch index of the message running now, read by the host if it abandons the worker
-- After BATCH_TIME seconds the batch returns early, so messages waiting behind a slow one
-- go back to the shared buffer for other workers. `durs` (double[total + 1]): each message's
-- time when the host measures handler durations (`timed`), and in durs[total] always the time
-- the call has spent running messages so far (the host's measure of a slow handler, which
-- waiting for the GIL after the call does not inflate).
-- deliver_batch(timeout, timed, n, body1, attempt1, ...) ->
--   k                              messages 1..k acked; k < n: the rest did not start
--   k, status, msg, tb, kind       messages 1..k acked, message k + 1 ended as `status`
local BATCH_TIME = 0.005
local ok_ffi, ffi = pcall(require, "ffi")
if not ok_ffi then ffi = nil end

function host.batch_deliverer(id, ctl_address, durs_address, total)
    local entry = loaded[id]
    if ffi == nil or entry == nil or entry.fn == nil then return nil end
    local fn = entry.fn
    local ctl = ffi.cast("volatile int32_t *", ctl_address)
    local durs = ffi.cast("double *", durs_address)
    return function(timeout, timed, n, ...)
        local args = { ... }
        local started = clock()
        local now = started
        durs[total] = 0
        for i = 1, n do
            if ctl[0] ~= 0 then return i - 1 end
            if i > 1 and now - started > BATCH_TIME then return i - 1 end
            ctl[1] = i
            local status, msg, tb, kind = deliver_one(fn, args[2 * i - 1], nil, false, args[2 * i], timeout, i)
            local t1 = clock()
            if timed then durs[i - 1] = t1 - now end
            now = t1
            durs[total] = now - started
            if status ~= ACK then return i - 1, status, msg, tb, kind end
        end
        return n
    end
end

return host
