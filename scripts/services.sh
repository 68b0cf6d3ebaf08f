#!/usr/bin/env bash
# Starts the local services the tests need when they are not listening, and
# says clearly what is missing when a service cannot be started.
#   scripts/services.sh [postgres] [rabbitmq] [nats] [redis]   (default: all the suite needs)
set -uo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # port name
  for _ in $(seq 1 60); do listening "$1" && return 0; sleep 0.5; done
  echo "services: $2 did not start listening on 127.0.0.1:$1" >&2
  return 1
}

start_postgres() {
  listening 5432 && return 0
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    ver=$(ls /etc/postgresql | sort -n | tail -n 1)
    echo "services: starting PostgreSQL $ver"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    wait_for 5432 PostgreSQL
  else
    echo "services: PostgreSQL is not listening on 127.0.0.1:5432 and is not installed (Debian: apt-get install postgresql)" >&2
    return 1
  fi
}

start_rabbitmq() {
  listening 5672 && return 0
  command -v rabbitmq-server >/dev/null 2>&1 || { echo "services: RabbitMQ is not installed (apt-get install rabbitmq-server)" >&2; return 1; }
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_for 5672 RabbitMQ
}

start_nats() {
  listening 4222 && return 0
  command -v nats-server >/dev/null 2>&1 || { echo "services: nats-server is not installed (apt-get install nats-server)" >&2; return 1; }
  echo "services: starting NATS with JetStream"
  mkdir -p /tmp/stele-nats
  nohup nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/stele-nats >/tmp/stele-nats.log 2>&1 &
  wait_for 4222 NATS
}

start_redis() {
  listening 6379 && return 0
  command -v redis-server >/dev/null 2>&1 || { echo "services: redis-server is not installed (apt-get install redis-server)" >&2; return 1; }
  echo "services: starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
  wait_for 6379 Redis
}

want=("$@")
[ ${#want[@]} -eq 0 ] && want=(postgres rabbitmq nats redis)
rc=0
for s in "${want[@]}"; do
  "start_$s" || rc=1
done
exit $rc
