-- text.lua: a small library.lua imported by greet.lua as `text`.
-- Contract: returns a table of pure string helpers.
local M = {}

function M.title(s)
    return (s:gsub("(%a)([%w']*)", function(first, rest) return first:upper() .. rest:lower() end))
end

function M.trim(s)
    return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

return M
