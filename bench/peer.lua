-- The peer a user would otherwise build for civicgate's Redis features:
-- OpenResty-style Lua on Debian's nginx (libnginx-mod-http-lua) with
-- lua-resty-redis (packaged as nginx.redis), a connection from the
-- cosocket keepalive pool (at most 64, others wait) per Redis round trip.  bench/run.sh loads it in
-- the gateway for its scenarios L1 to L4:
--
--   L1  event(): after the response (log phase), an ngx.timer.at(0) XADDs
--       the request's event, the same nine fields as civicgate's events
--   L2  limit(): fixed one-second window per citizen, INCR + EXPIRE
--       pipelined in one round trip, 429 above the rate
--   L3  consent(): HGET of the citizen's consent for the purpose, 403 when
--       absent
--   L4  full(): L2 + L3 + the event's XADD in one pipelined round trip,
--       before the response (the event cannot know the response's status
--       and upstream time then: both fields are empty)
--
-- Like civicgate, the peer keeps raw citizen IDs out of Redis (an MD5 of
-- a secret and the ID stands for the pseudonym) and counts what it did in
-- a shared dictionary, read by the bench through metrics().  Unlike
-- civicgate, it neither signs nor checks journey IDs: a new journey gets
-- a random ID.

local redis = require "nginx.redis"

local _M = {}

local conf = {
    host = "127.0.0.1",
    port = 6379,
    secret = "",
    rate = 1000,          -- requests per citizen per second (L2, L4)
    purpose = "bench",    -- the consent checked (L3, L4)
    timeout = 500,        -- ms, every Redis operation on the request path
    -- ms, the events' timers: they wait for a pooled connection, not a
    -- client, and an event given up is lost
    event_timeout = 10000,
    pool = 64,            -- connections per worker, at most
    -- requests waiting for one of them; without a backlog every request
    -- beyond the pool opens (and closes) a connection of its own, and a
    -- burst of events becomes a storm of connects that Redis cannot accept
    -- within the timeout
    backlog = 65536,
    idle = 10000,         -- ms a pooled connection may stay idle
}

local counters = ngx.shared.peer


-- configure{...}: from init_by_lua, before the workers start
function _M.configure(t)
    for k, v in pairs(t) do
        conf[k] = v
    end
end


local function count(name)
    counters:incr(name, 1, 0)
end


local function connect(timeout)
    local red = redis:new()
    red:set_timeout(timeout or conf.timeout)
    local ok, err = red:connect(conf.host, conf.port,
                                { pool_size = conf.pool, backlog = conf.backlog })
    if not ok then
        return nil, err
    end
    return red
end


-- back to the pool after a complete exchange; closed after an error,
-- when the connection may hold an unread reply
local function release(red, failed)
    if failed then
        red:close()
    else
        red:set_keepalive(conf.idle)
    end
end


local function pseudonym(citizen)
    if citizen == nil or citizen == "" then
        return ""
    end
    return ngx.md5(conf.secret .. citizen)
end


local function random_hex(groups)
    local t = {}
    for i = 1, groups do
        t[i] = string.format("%04x", math.random(0, 65535))
    end
    return table.concat(t)
end


-- a new journey's ID, in civicgate's canonical form (23 characters)
local alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

local function new_journey()
    local t = {}
    for i = 1, 23 do
        if i % 6 == 0 then
            t[i] = "-"
        else
            local r = math.random(1, 32)
            t[i] = string.sub(alphabet, r, r)
        end
    end
    return table.concat(t)
end


-- the event's nine fields, in civicgate's order, as XADD arguments;
-- the request's journey (header) or a new one
local function event_args(stream, citizen, status, latency)
    local journey = ngx.var.http_x_journey_id
    if journey == nil or journey == "" then
        journey = new_journey()
    end
    return {
        stream, "*",
        "time", string.format("%d", math.floor(ngx.now() * 1000)),
        "eid", random_hex(4),
        "journey", journey,
        "channel", ngx.var.http_x_channel or "unknown",
        "service", "bench",
        "method", ngx.req.get_method(),
        "status", status,
        "latency_ms", latency,
        "citizen", citizen,
    }
end


-- L1: the timer's work, outside the request
local function write_event(premature, args)
    if premature then
        count("L1 failed")
        return
    end
    local red, err = connect(conf.event_timeout)
    if not red then
        ngx.log(ngx.ERR, "peer: event: ", err)
        count("L1 failed")
        return
    end
    local id
    id, err = red:xadd(unpack(args))
    if not id then
        ngx.log(ngx.ERR, "peer: event: ", err)
        count("L1 failed")
        release(red, true)
        return
    end
    release(red)
    count("L1 written")
end


-- L1, log_by_lua: an event per request, written after the response
function _M.event(stream)
    local ms = tonumber(ngx.var.upstream_response_time)
    local args = event_args(stream, pseudonym(ngx.var.http_x_citizen_id),
                            tostring(ngx.status),
                            ms and string.format("%d", math.floor(ms * 1000)) or "")
    local ok, err = ngx.timer.at(0, write_event, args)
    if not ok then
        ngx.log(ngx.ERR, "peer: event timer: ", err)
        count("L1 failed")
    end
end


-- one pipelined round trip; the replies, or nil after counting the
-- failure
local function pipeline(name, commands)
    local red, err = connect()
    if not red then
        ngx.log(ngx.ERR, "peer: ", err)
        count(name .. " failed")
        return nil
    end
    red:init_pipeline(#commands)
    for _, c in ipairs(commands) do
        red[c[1]](red, unpack(c, 2))
    end
    local res
    res, err = red:commit_pipeline()
    if not res then
        ngx.log(ngx.ERR, "peer: ", err)
        count(name .. " failed")
        release(red, true)
        return nil
    end
    release(red)
    for _, r in ipairs(res) do
        -- a command's own error reply
        if type(r) == "table" and r[1] == false then
            ngx.log(ngx.ERR, "peer: ", r[2])
            count(name .. " failed")
            return nil
        end
    end
    return res
end


local function limit_commands(citizen)
    local window = math.floor(ngx.now())
    local key = "peer:{l:" .. citizen .. "}:" .. window
    return { "incr", key }, { "expire", key, 2 }
end


local function consent_command(citizen)
    return { "hget", "peer:{c:" .. citizen .. "}:consents", conf.purpose }
end


-- L2, access_by_lua: the failure policy is fail-open, as a user would
-- choose for a limit
function _M.limit()
    local incr, expire = limit_commands(pseudonym(ngx.var.http_x_citizen_id))
    local res = pipeline("L2", { incr, expire })
    if res and res[1] > conf.rate then
        count("L2 rejected")
        return ngx.exit(429)
    end
    count("L2 passed")
end


-- L3, access_by_lua: no consent, or no answer, is a 403
function _M.consent()
    local res = pipeline("L3", {
        consent_command(pseudonym(ngx.var.http_x_citizen_id)) })
    if not res or res[1] == ngx.null then
        count("L3 denied")
        return ngx.exit(403)
    end
    count("L3 granted")
end


-- L4, access_by_lua: limit, consent and event in one round trip
function _M.full(stream)
    local citizen = pseudonym(ngx.var.http_x_citizen_id)
    local incr, expire = limit_commands(citizen)
    local xadd = event_args(stream, citizen, "", "")
    table.insert(xadd, 1, "xadd")
    local res = pipeline("L4", { incr, expire, consent_command(citizen), xadd })
    if not res then
        return ngx.exit(503)
    end
    count("L4 written")
    if res[1] > conf.rate then
        count("L4 rejected")
        return ngx.exit(429)
    end
    if res[3] == ngx.null then
        count("L4 denied")
        return ngx.exit(403)
    end
end


-- the bench's setup: grants the consent to the request's citizen
function _M.grant()
    local res = pipeline("grant", { {
        "hset", "peer:{c:" .. pseudonym(ngx.var.http_x_citizen_id) .. "}:consents",
        conf.purpose, '{"granted":"' .. ngx.today() .. '"}' } })
    if not res then
        return ngx.exit(503)
    end
    ngx.say("granted")
end


-- the counters, one "NAME VALUE" line each ("L1 written 123")
function _M.metrics()
    for _, k in ipairs(counters:get_keys(0)) do
        ngx.say(k, " ", counters:get(k))
    end
end


return _M
