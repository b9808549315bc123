-- clock.lua: a monotonic wall clock in seconds, for time limits.
-- Contract: run once per Lua state by the host with (bridge); returns a function.
-- LuaJIT reads CLOCK_MONOTONIC through the FFI (no call into Python); Lua 5.4 asks the host.
local bridge = ...
local ok, ffi = pcall(require, "ffi")
if ok and ffi then
    local okdef = pcall(ffi.cdef, [[
        typedef struct { long tv_sec; long tv_nsec; } runtime_timespec;
        int clock_gettime(int clk_id, runtime_timespec *tp);
    ]])
    if okdef then
        local ts = ffi.new("runtime_timespec")
        local C, tonumber = ffi.C, tonumber
        return function()
            C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
            return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
        end
    end
end
local monotonic = bridge.monotonic
return function() return monotonic() end
