-- greet.lua: the `demo:greet` function.
-- Contract: greet(person) where person is a name string or {name = ...}; returns
-- {greeting, calls} where `calls` counts calls served by this Lua state (module-level
-- state persists per worker). A missing name returns nil and an Invalid error.
local json = require("json")
local logger = require("logger"):named("greeter")
local text = require("text")

local calls = 0

local function greet(person)
    -- A JSON text is decoded; a table (or a plain name) is used as it is.
    local data = person
    if type(person) == "string" and person:find("^%s*[{\"]") then data = json.decode(person) end
    local name = type(data) == "table" and data.name or data
    if type(name) ~= "string" or text.trim(name) == "" then
        return nil, errors.new({ message = "a name is required", kind = errors.INVALID })
    end
    calls = calls + 1
    local greeting = "Hello, " .. text.title(text.trim(name)) .. "!"
    logger:info("greeted", { name = name, calls = calls })
    return { greeting = greeting, calls = calls }
end

return { greet = greet }
