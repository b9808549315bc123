local json = require("json")

return function(body)
  local count = = 1
  return count
end
