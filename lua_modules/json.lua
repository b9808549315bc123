-- json.lua: JSON encode/decode for the `json` module and the json/plain codec (SPEC §5).
-- Contract: run once per Lua state by the host, in the trusted global environment, with the
-- errors module as its argument. Returns a table with:
--   decode(s) -> value | nil, err        (already-decoded tables/numbers/booleans pass through)
--   encode(v) -> string | nil, err       (NaN and ±Inf become null)
--   encode_strict(v) -> string | nil, err (NaN/±Inf refused: values must travel unchanged)
--   encode_lenient(v) -> string           (never fails; for log fields)
--   encode_msgpack(v) -> string | nil, err (strict, as MessagePack made transport-safe by
--                                           msgpack.lua; needs the msgpack primitives)
--   is_object(t) -> bool                  (t came from decoding an empty `{}`)
--   utf8_clean(s) -> s                    (invalid UTF-8 bytes replaced by U+FFFD)
-- Errors are returned as values of kind Invalid, never raised, except for a wrong argument type
-- and for the limits (a Timeout, out of memory), which pass through as raised errors.
local errors, mp = ...
local byte, sub, find, format, char, rep = string.byte, string.sub, string.find, string.format, string.char, string.rep
local concat, sort = table.concat, table.sort
local type, next, tostring, tonumber, error, pairs = type, next, tostring, tonumber, error, pairs
local floor, huge = math.floor, math.huge
local setmetatable, getmetatable = setmetatable, getmetatable

-- Under the JIT a byte loop is compiled and beats a pattern search for the short strings of
-- typical messages; interpreted (a Lua 5.4 state, or LuaJIT with the JIT off), one
-- pattern search is cheaper than a byte() call per character.
local JIT_ON = jit ~= nil and jit.status ~= nil and jit.status()

local MAX_ENCODE_DEPTH = 128
local MAX_DECODE_DEPTH = 512

-- Tables decoded from an empty JSON object, so they encode back to {} rather than [].
local object_marks = setmetatable({}, { __mode = "k" })

local function invalid(msg)
    return nil, errors.new({ message = msg, kind = "Invalid", retryable = false })
end

---------------------------------------------------------------------------------------------
-- UTF-8 cleaning: invalid sequences become U+FFFD, as Go's encoding/json does.
local REPLACEMENT = "\239\191\189"
local function utf8_clean(s)
    if not find(s, "[\128-\255]") then return s end
    local out, n, i, len, start = {}, 0, 1, #s, 1
    while i <= len do
        local c = byte(s, i)
        local size = 0
        if c < 0x80 then size = 1
        elseif c >= 0xC2 and c <= 0xDF then size = 2
        elseif c >= 0xE0 and c <= 0xEF then size = 3
        elseif c >= 0xF0 and c <= 0xF4 then size = 4 end
        local ok = size > 0 and i + size - 1 <= len
        if ok and size > 1 then
            local c2 = byte(s, i + 1)
            if c == 0xE0 and c2 < 0xA0 or c == 0xED and c2 > 0x9F or c == 0xF0 and c2 < 0x90
                or c == 0xF4 and c2 > 0x8F then
                ok = false
            end
            for k = i + 1, i + size - 1 do
                local ck = byte(s, k)
                if ck < 0x80 or ck > 0xBF then ok = false break end
            end
        end
        if ok then
            i = i + size
        else
            n = n + 1; out[n] = sub(s, start, i - 1)
            n = n + 1; out[n] = REPLACEMENT
            i = i + 1
            start = i
        end
    end
    if start == 1 then return s end
    n = n + 1; out[n] = sub(s, start)
    return concat(out)
end

---------------------------------------------------------------------------------------------
-- Encoding
local ESCAPES = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
                  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }
for i = 0, 31 do
    local c = char(i)
    if not ESCAPES[c] then ESCAPES[c] = format("\\u%04x", i) end
end

-- A string that is ASCII with nothing to escape: it is valid UTF-8 and encodes as itself in
-- quotes (most keys and values), found with one scan instead of a cleaning and an escape pass.
local function plain(s)
    if JIT_ON then
        for i = 1, #s do
            local c = byte(s, i)
            if c < 32 or c > 126 or c == 34 or c == 92 then return false end
        end
        return true
    end
    return not find(s, '[%z\1-\31"\\\127-\255]')
end

local function encode_string(s)
    if plain(s) then return '"' .. s .. '"' end
    s = utf8_clean(s)
    if find(s, '[%z\1-\31"\\]') then
        s = s:gsub('[%z\1-\31"\\]', ESCAPES)
    end
    return '"' .. s .. '"'
end

local function encode_number(v)
    if v == floor(v) and v > -9007199254740992 and v < 9007199254740992 then
        if v == 0 and 1 / v < 0 then return "-0.0" end -- keep the sign of -0.0
        return format("%d", v)
    end
    for _, f in ipairs({ "%.14g", "%.15g", "%.16g" }) do
        local s = format(f, v)
        if tonumber(s) == v then return s end
    end
    return format("%.17g", v)
end

local function valid_utf8(s) return plain(s) or utf8_clean(s) == s end

-- mode: "json" (NaN/Inf -> null), "strict" (NaN/Inf and invalid UTF-8 refused: values must
-- travel unchanged), "lenient" (never fails). fmt: nil for JSON text, or the msgpack
-- primitives (then strings that are not UTF-8 travel as bin, byte for byte).
local function encoder(mode, fmt)
    local buf, n
    local function str(s)
        if fmt then return fmt.string(s, valid_utf8(s)) end
        return encode_string(s)
    end
    local seen = {}
    local fail

    local function put(s) n = n + 1; buf[n] = s end

    local value

    local function table_value(t, depth)
        if depth > MAX_ENCODE_DEPTH then
            if mode == "lenient" then put('"<too deep>"') return end
            fail = "value is nested deeper than " .. MAX_ENCODE_DEPTH .. " levels"
            return
        end
        if seen[t] then
            if mode == "lenient" then put('"<cycle>"') return end
            fail = "cannot encode a table that contains itself (cycle)"
            return
        end
        if errors.is_error(t) then put(str(tostring(t))) return end
        local count, maxn, strings, numbers = 0, 0, 0, 0
        for k in next, t do
            count = count + 1
            local tk = type(k)
            if tk == "string" then
                strings = strings + 1
            elseif tk == "number" and k >= 1 and k == floor(k) then
                numbers = numbers + 1
                if k > maxn then maxn = k end
            elseif mode == "lenient" then
                strings = strings + 1
            else
                fail = "cannot encode a table key of type " .. tk .. (tk == "number" and (" (" .. tostring(k) .. ")") or "")
                return
            end
        end
        seen[t] = true
        if count == 0 then
            if fmt then put(object_marks[t] and fmt.map(0) or fmt.array(0))
            else put(object_marks[t] and "{}" or "[]") end
        elseif numbers == count and maxn == count then
            put(fmt and fmt.array(count) or "[")
            for i = 1, count do
                if i > 1 and not fmt then put(",") end
                value(t[i], depth + 1)
                if fail then return end
            end
            if not fmt then put("]") end
        elseif numbers > 0 and mode ~= "lenient" then
            if strings > 0 then
                fail = "cannot encode a table with both string keys and array indices (mixed keys)"
            else
                fail = "cannot encode a sparse array (indices 1.." .. maxn .. " with " .. count .. " values)"
            end
            return
        else
            local keys, kn = {}, 0
            for k in next, t do kn = kn + 1; keys[kn] = tostring(k) end
            sort(keys)
            put(fmt and fmt.map(kn) or "{")
            for i = 1, kn do
                local k = keys[i]
                if mode == "strict" and not fmt and not valid_utf8(k) then
                    fail = "cannot send a table key that is not valid UTF-8 text"
                    return
                end
                if fmt then put(str(k)) else
                    if i > 1 then put(",") end
                    put(encode_string(k)); put(":")
                end
                local v = t[k]
                if v == nil then v = t[tonumber(k)] end
                value(v, depth + 1)
                if fail then return end
            end
            if not fmt then put("}") end
        end
        seen[t] = nil
    end

    value = function(v, depth)
        local tv = type(v)
        if tv == "string" then
            if mode == "strict" and not fmt and not valid_utf8(v) then
                fail = "cannot send a string that is not valid UTF-8 text as JSON (use the application/msgpack codec for bytes)"
                return
            end
            put(str(v))
        elseif tv == "number" then
            if v ~= v or v == huge or v == -huge then
                if mode == "strict" then
                    fail = "cannot send " .. tostring(v) .. " (NaN and infinities have no JSON form)"
                else
                    put("null")
                end
            else
                put(fmt and fmt.number(v) or encode_number(v))
            end
        elseif tv == "boolean" then
            put(fmt and fmt.boolean(v) or (v and "true" or "false"))
        elseif tv == "nil" then
            put(fmt and fmt.null() or "null")
        elseif tv == "table" then
            table_value(v, depth)
        elseif mode == "lenient" then
            put(str(tostring(v)))
        else
            fail = "cannot encode a value of type " .. tv
        end
    end

    return function(v)
        buf, n, fail = {}, 0, nil
        for k in next, seen do seen[k] = nil end
        value(v, 1)
        if fail then
            local msg = fail
            buf, fail = nil, nil
            for k in next, seen do seen[k] = nil end
            return invalid((fmt and "msgpack.encode: " or "json.encode: ") .. msg)
        end
        local out = concat(buf, "", 1, n)
        buf = nil
        if fmt then return fmt.transport(out) end
        return out
    end
end

---------------------------------------------------------------------------------------------
-- Decoding
local decode_error

local function skip_ws(s, i)
    local c = byte(s, i)
    if c ~= 32 and c ~= 10 and c ~= 13 and c ~= 9 then return i end -- compact JSON: no call
    local _, e = find(s, "^[ \n\r\t]*", i)
    return e + 1
end

local function codepoint_to_utf8(n)
    if n < 0x80 then return char(n) end
    if n < 0x800 then return char(0xC0 + floor(n / 64), 0x80 + n % 64) end
    if n < 0x10000 then
        return char(0xE0 + floor(n / 4096), 0x80 + floor(n / 64) % 64, 0x80 + n % 64)
    end
    return char(0xF0 + floor(n / 262144), 0x80 + floor(n / 4096) % 64, 0x80 + floor(n / 64) % 64,
                0x80 + n % 64)
end

local function line_col(s, pos)
    local line, last = 1, 1
    for p in s:sub(1, pos - 1):gmatch("()\n") do line = line + 1; last = p + 1 end
    return line, pos - last + 1
end

local function fail_at(s, pos, what)
    if pos > #s then what = "unexpected end of input" end
    local line, col = line_col(s, pos)
    decode_error = format("json.decode: %s at line %d column %d", what, line, col)
    error(decode_error, 0)
end

local parse_value

-- Strings with an escape or a control character take this general path from j on.
local function parse_string_from(s, i, j)
    local parts, pn = nil, 0
    while true do
        local k = find(s, '[%z\1-\31"\\]', j)
        if not k then fail_at(s, i, "unterminated string") end
        local c = byte(s, k)
        if c == 34 then -- closing quote
            local piece = sub(s, j, k - 1)
            if parts then
                pn = pn + 1; parts[pn] = piece
                return concat(parts, "", 1, pn), k + 1
            end
            return piece, k + 1
        elseif c == 92 then -- backslash
            parts = parts or {}
            pn = pn + 1; parts[pn] = sub(s, j, k - 1)
            local e = byte(s, k + 1)
            if e == 117 then -- \u
                local hex = sub(s, k + 2, k + 5)
                if not find(hex, "^%x%x%x%x$") then fail_at(s, k, "invalid \\u escape") end
                local n = tonumber(hex, 16)
                j = k + 6
                if n >= 0xD800 and n <= 0xDBFF then
                    local lo = find(s, "^\\u[dD][c-fC-F]%x%x", j) and tonumber(sub(s, j + 2, j + 5), 16)
                    if lo then
                        n = 0x10000 + (n - 0xD800) * 1024 + (lo - 0xDC00)
                        j = j + 6
                    else
                        n = 0xFFFD
                    end
                elseif n >= 0xDC00 and n <= 0xDFFF then
                    n = 0xFFFD
                end
                pn = pn + 1; parts[pn] = codepoint_to_utf8(n)
            else
                local map = e == 34 and '"' or e == 92 and "\\" or e == 47 and "/" or e == 98 and "\b"
                    or e == 102 and "\f" or e == 110 and "\n" or e == 114 and "\r" or e == 116 and "\t"
                if not map then fail_at(s, k, "invalid escape in string") end
                pn = pn + 1; parts[pn] = map
                j = k + 2
            end
        else
            fail_at(s, k, "control character in string")
        end
    end
end


local function parse_string(s, i)
    -- s[i] is the opening quote
    local j = i + 1
    if JIT_ON then
        local k = j
        while true do
            local c = byte(s, k)
            if c == 34 then return sub(s, j, k - 1), k + 1 end
            if c == nil or c == 92 or c < 32 then break end
            k = k + 1
        end
    else
        local k = find(s, '[%z\1-\31"\\]', j)
        if k and byte(s, k) == 34 then return sub(s, j, k - 1), k + 1 end
    end
    return parse_string_from(s, i, j)
end

local function digit(c) return c ~= nil and c >= 48 and c <= 57 end

local function parse_number(s, i)
    local j, sign = i, 1
    local c = byte(s, j)
    if c == 45 then j, sign = j + 1, -1; c = byte(s, j) end
    if not digit(c) then fail_at(s, i, "unexpected character '" .. sub(s, i, i) .. "'") end
    local first, n = j, 0
    repeat
        n = n * 10 + (c - 48)
        j = j + 1
        c = byte(s, j)
    until not digit(c)
    if j > first + 1 and byte(s, first) == 48 then fail_at(s, i, "number with a leading zero") end
    if c ~= 46 and c ~= 101 and c ~= 69 then
        if j - first <= 15 then return sign * n, j end -- exact: no string made for an integer
        return tonumber(sub(s, i, j - 1)), j
    end
    if c == 46 then
        if not digit(byte(s, j + 1)) then fail_at(s, j, "malformed number") end
        j = j + 2
        while digit(byte(s, j)) do j = j + 1 end
        c = byte(s, j)
    end
    if c == 101 or c == 69 then
        local k = j + 1
        c = byte(s, k)
        if c == 43 or c == 45 then k = k + 1; c = byte(s, k) end
        if not digit(c) then fail_at(s, j, "malformed number") end
        repeat k = k + 1 until not digit(byte(s, k))
        j = k
    end
    return tonumber(sub(s, i, j - 1)), j
end

local function parse_array(s, i, depth)
    local t, n = {}, 0
    i = skip_ws(s, i + 1)
    if byte(s, i) == 93 then return t, i + 1 end
    while true do
        local v
        v, i = parse_value(s, i, depth)
        n = n + 1
        t[n] = v
        i = skip_ws(s, i)
        local c = byte(s, i)
        if c == 93 then return t, i + 1 end
        if c ~= 44 then fail_at(s, i, "expected ',' or ']' in array") end
        i = skip_ws(s, i + 1)
    end
end

local function parse_object(s, i, depth)
    local t = {}
    i = skip_ws(s, i + 1)
    if byte(s, i) == 125 then
        object_marks[t] = true
        return t, i + 1
    end
    while true do
        if byte(s, i) ~= 34 then fail_at(s, i, "expected a string key in object") end
        local k, v
        k, i = parse_string(s, i)
        i = skip_ws(s, i)
        if byte(s, i) ~= 58 then fail_at(s, i, "expected ':' after object key") end
        i = skip_ws(s, i + 1)
        v, i = parse_value(s, i, depth)
        t[k] = v
        i = skip_ws(s, i)
        local c = byte(s, i)
        if c == 125 then return t, i + 1 end
        if c ~= 44 then fail_at(s, i, "expected ',' or '}' in object") end
        i = skip_ws(s, i + 1)
    end
end

parse_value = function(s, i, depth)
    local c = byte(s, i)
    if c == 123 then
        if depth >= MAX_DECODE_DEPTH then fail_at(s, i, "nesting too deep") end
        return parse_object(s, i, depth + 1)
    elseif c == 91 then
        if depth >= MAX_DECODE_DEPTH then fail_at(s, i, "nesting too deep") end
        return parse_array(s, i, depth + 1)
    elseif c == 34 then
        return parse_string(s, i)
    elseif c == 116 then
        if sub(s, i, i + 3) == "true" then return true, i + 4 end
    elseif c == 102 then
        if sub(s, i, i + 4) == "false" then return false, i + 5 end
    elseif c == 110 then
        if sub(s, i, i + 3) == "null" then return nil, i + 4 end
    elseif c == nil then
        fail_at(s, i, "unexpected end of input")
    else
        return parse_number(s, i)
    end
    fail_at(s, i, "unexpected character '" .. sub(s, i, i) .. "'")
end

local function decode_text(s)
    local i = skip_ws(s, 1)
    local v
    v, i = parse_value(s, i, 0)
    i = skip_ws(s, i)
    if i <= #s then fail_at(s, i, "unexpected text after the JSON value") end
    return v
end

local pcall = pcall

local M = { is_object = function(t) return object_marks[t] == true end, utf8_clean = utf8_clean }

function M.decode(s)
    local ts = type(s)
    if ts ~= "string" then
        if ts == "table" or ts == "number" or ts == "boolean" then return s end
        error("bad argument #1 to 'decode' (string expected, got " .. ts .. ")", 2)
    end
    local ok, v = pcall(decode_text, s)
    if ok then return v end
    -- Only malformed input is returned as an error: anything else that stopped the decoder
    -- (the time limit, out of memory) is raised again, never swallowed.
    if v ~= decode_error then error(v, 0) end
    return invalid(v)
end

local encode_json, encode_strict, encode_lenient = encoder("json"), encoder("strict"), encoder("lenient")

function M.encode(v) return encode_json(v) end
function M.encode_strict(v) return encode_strict(v) end
if mp then
    local encode_mp = encoder("strict", mp)
    function M.encode_msgpack(v) return encode_mp(v) end
end
function M.encode_lenient(v)
    local s = encode_lenient(v)
    return s or "null"
end

return M
