#!/bin/sh
# Registers this container's demo backend in Consul through the agent API,
# with an HTTP check, and deregisters it on stop. Used by the backend-consul
# service of docker-compose.yml (the image ships curl, see its entrypoint).
set -eu
id="web-consul-$(hostname)"
ip="$(hostname -i | awk '{print $1}')"
curl -fsS -X PUT "http://${CONSUL:-consul:8500}/v1/agent/service/register" -d @- <<JSON
{"ID":"$id","Name":"web-consul","Address":"$ip","Port":9000,
 "Check":{"HTTP":"http://$ip:9000/healthz","Interval":"1s","Timeout":"1s","DeregisterCriticalServiceAfter":"1m"}}
JSON
trap 'curl -fsS -X PUT "http://${CONSUL:-consul:8500}/v1/agent/service/deregister/$id"; kill -TERM $pid 2>/dev/null' TERM INT
rota demo-backend --name "$(hostname)" --listen :9000 &
pid=$!
wait $pid
