return function(body)
  if body.n > 1 then
    return true
  else if
end
