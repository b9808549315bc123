-- A job handler: about 1 ms of work per job; a job with `fail = true` returns an error on
-- every attempt (retried after 200 ms, 400 ms, then dead-lettered to rabbit:failed).
local logger = require("logger")
local time = require("time")

return function(job)
  if job.fail then
    return nil, "job " .. tostring(job.id) .. " cannot be done"
  end
  time.sleep(0.001)
  if job.id % 1000 == 0 then
    logger:info("progress", { id = job.id })
  end
end
