-- work.lua: one job {id, fail?}. About 1 ms of work each; a job with `fail = true` returns
-- an error every time, is retried, and after 3 attempts lands in redis:failed.
local logger = require("logger")
local time = require("time")

return function(job)
    time.sleep(0.001)  -- the work: stands for a call to something slow
    if job.fail then
        return nil, errors.new({ message = "job " .. tostring(job.id) .. " cannot be done", kind = errors.INVALID })
    end
    if job.id % 1000 == 0 then
        logger.info("done", { id = job.id })
    end
    return true
end
