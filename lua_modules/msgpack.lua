-- msgpack.lua: the primitives of MessagePack output, for the application/msgpack codec.
-- Contract: run once per Lua state by the host with no arguments. Returns a table of
-- functions each returning the encoding of one item as a Lua string of bytes:
--   null(), boolean(b), number(v) (integers within ±2^53 as msgpack ints, others float64),
--   string(s, valid_utf8) (str when valid UTF-8, else bin: every byte travels unchanged),
--   array(n), map(n) (headers; the items follow), and transport(s), which turns the bytes
--   into text lupa can hand to Python unchanged (each byte >= 0x80 becomes the UTF-8 form of
--   the code point of the same number; the host reads it back as latin-1).
-- The traversal (which tables are arrays or maps, what is refused) is json.lua's, shared.
local char, gsub = string.char, string.gsub
local floor = math.floor
local frexp = math.frexp
local pack = string.pack

local M = {}

local function be(v, n) -- v (a non-negative integer < 2^(8n)) as n big-endian bytes
    local out = {}
    for i = n, 1, -1 do
        out[i] = char(v % 256)
        v = floor(v / 256)
    end
    return table.concat(out)
end

local function float64(v)
    if pack then return "\203" .. pack(">d", v) end
    local sign = 0
    if v < 0 or (v == 0 and 1 / v < 0) then sign = 0x80000000; v = -v end
    local exponent, mantissa
    if v == 0 then
        exponent, mantissa = 0, 0
    else
        local m, e = frexp(v) -- v = m * 2^e, 0.5 <= m < 1
        exponent = e + 1022
        if exponent <= 0 then -- subnormal
            mantissa = v * 2 ^ 1074
            exponent = 0
        else
            mantissa = (m * 2 - 1) * 2 ^ 52
        end
    end
    local hi = sign + exponent * 0x100000 + floor(mantissa / 0x100000000)
    local lo = mantissa % 0x100000000
    return "\203" .. be(hi, 4) .. be(lo, 4)
end

function M.null() return "\192" end
function M.boolean(b) return b and "\195" or "\194" end

function M.number(v)
    if v ~= floor(v) or v <= -9007199254740992 or v >= 9007199254740992 or (v == 0 and 1 / v < 0) then
        return float64(v)
    end
    if v >= 0 then
        if v < 128 then return char(v) end
        if v < 256 then return "\204" .. char(v) end
        if v < 65536 then return "\205" .. be(v, 2) end
        if v < 4294967296 then return "\206" .. be(v, 4) end
        return "\207" .. be(v, 8)
    end
    if v >= -32 then return char(256 + v) end
    if v >= -128 then return "\208" .. char(256 + v) end
    if v >= -32768 then return "\209" .. be(65536 + v, 2) end
    if v >= -2147483648 then return "\210" .. be(4294967296 + v, 4) end
    -- two's complement in 8 bytes: the high word carries the sign
    local hi = floor(v / 4294967296)
    local lo = v - hi * 4294967296
    return "\211" .. be(hi + 4294967296, 4) .. be(lo, 4)
end

function M.string(s, valid_utf8)
    local n = #s
    if valid_utf8 then
        if n < 32 then return char(0xA0 + n) .. s end
        if n < 256 then return "\217" .. char(n) .. s end
        if n < 65536 then return "\218" .. be(n, 2) .. s end
        return "\219" .. be(n, 4) .. s
    end
    if n < 256 then return "\196" .. char(n) .. s end
    if n < 65536 then return "\197" .. be(n, 2) .. s end
    return "\198" .. be(n, 4) .. s
end

function M.array(n)
    if n < 16 then return char(0x90 + n) end
    if n < 65536 then return "\220" .. be(n, 2) end
    return "\221" .. be(n, 4)
end

function M.map(n)
    if n < 16 then return char(0x80 + n) end
    if n < 65536 then return "\222" .. be(n, 2) end
    return "\223" .. be(n, 4)
end

local LATIN1 = {}
for b = 128, 255 do LATIN1[char(b)] = char(0xC0 + floor(b / 64), 0x80 + b % 64) end
function M.transport(s) return (gsub(s, "[\128-\255]", LATIN1)) end

return M
