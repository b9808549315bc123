-- Helpers shared by handlers.
local M = {}

function M.half(n)
  return n // 2
end

return M
