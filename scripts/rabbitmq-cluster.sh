#!/usr/bin/env bash
# A three-node RabbitMQ cluster on loopback, for tests and for trying credex on a cluster.
#
#   scripts/rabbitmq-cluster.sh start           start the three nodes (the first start clusters
#                                              nodes 2 and 3 with node 1), wait until all three
#                                              run in one cluster, print the AMQP URLs on stdout
#   scripts/rabbitmq-cluster.sh stop            stop all three and delete their data and logs
#   scripts/rabbitmq-cluster.sh status          the nodes, the cluster's members, every quorum
#                                              queue with its leader; exit 0 when all three run
#   scripts/rabbitmq-cluster.sh urls            print the AMQP URLs (comma-separated)
#   scripts/rabbitmq-cluster.sh kill N          SIGKILL node N's Erlang VM (N = 1, 2 or 3): a crash
#   scripts/rabbitmq-cluster.sh start-node N    start node N again; it rejoins the cluster
#   scripts/rabbitmq-cluster.sh leader QUEUE [VHOST]
#                                              print the number (1-3) of the node leading a queue
#
# `start` is idempotent: nodes that run are left alone (a killed one is started again) and the
# URLs are printed. Progress and errors go to stderr, so
#     export CREDEX_AMQP_URL="$(scripts/rabbitmq-cluster.sh start)"
# works. Node N is PREFIX<N>@localhost (credex1@localhost …) and listens for AMQP on
# 127.0.0.1 only; `rabbitmqctl -n credex2@localhost …` reaches it as it reaches the default node.
#
# Environment, read by the first `start` and recorded in $CREDEX_CLUSTER_DIR/cluster.conf, which
# the later commands follow until `stop` removes it:
#   CREDEX_CLUSTER_DIR        base directory of the nodes' files (/tmp/credex-rabbitmq-cluster)
#   CREDEX_CLUSTER_PREFIX     node names PREFIX1@localhost, PREFIX2@localhost … (credex)
#   CREDEX_CLUSTER_AMQP_PORT  node 1's AMQP port; nodes 2 and 3 take the next two (5681)
#   CREDEX_CLUSTER_DIST_PORT  node 1's Erlang distribution port, likewise (25681)
# and, read by every command:
#   CREDEX_CLUSTER_TIMEOUT    seconds to wait for a node to come up, for the cluster to form,
#                             and for a node to stop (120)
#
# How it is built, with the distribution's RabbitMQ package only:
# - Each node has its own directory $CREDEX_CLUSTER_DIR/PREFIX<N> holding its configuration file
#   (RABBITMQ_CONFIG_FILE: listeners.tcp.default on 127.0.0.1, because the distribution's
#   /etc/rabbitmq/rabbitmq.conf binds 127.0.0.1:5672 for the default node), its environment file
#   (RABBITMQ_CONF_ENV_FILE, so that /etc/rabbitmq/rabbitmq-env.conf and its NODENAME are not
#   read), an empty enabled-plugins file (no management or prometheus listener to collide), its
#   pid file, mnesia/ (data, quorum queue logs) and log/ (the node's log; startup.log catches what
#   a node prints before its logging is set up, such as a configuration error).
# - The nodes run as the rabbitmq user, like the distribution's own node, with HOME set to that
#   user's home: they use its Erlang cookie, /var/lib/rabbitmq/.erlang.cookie, which is the one
#   rabbitmqctl uses when root runs it (the distribution's wrapper runs it as rabbitmq through
#   su). So run this script as root (or as rabbitmq). The nodes register with the machine's epmd
#   (127.0.0.1:4369) beside the default node; the script never addresses the default node.
# - Nodes 2 and 3 join node 1 with rabbitmqctl stop_app, join_cluster, start_app. A node started
#   again keeps its data and rejoins by itself.
#
# Timings, measured on a 2-core machine shared with other test runs (load average 8-12;
# RabbitMQ 3.10.8, Erlang/OTP 25): `start` from nothing 30-52 s (the three nodes boot side by
# side in 14-25 s, the two joins, one after the other, take 12-25 s more); `start` when all run 2 s;
# `start` after all three were killed 25 s; `kill` under 1 s, and the queue's new leader is
# elected within 0.5 s; `start-node` of a killed node 9-15 s; `stop` 1.5-2 s. Each rabbitmqctl
# call costs 2-3 s of that here. More in docs/cluster.md.
set -euo pipefail

BASE=${CREDEX_CLUSTER_DIR:-/tmp/credex-rabbitmq-cluster}
CONF_FILE=$BASE/cluster.conf
TIMEOUT=${CREDEX_CLUSTER_TIMEOUT:-120}
# The real script, not /usr/sbin/rabbitmq-server: that wrapper, run by the rabbitmq user, sends
# a node's output to /var/log/rabbitmq/startup_log, the default node's file.
SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
NODES=(1 2 3)

say() { printf 'rabbitmq-cluster: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}
usage() {
  awk 'NR > 3 && /^#$/ { exit } NR > 3 { print "  " substr($0, 5) }' "$0" >&2
  exit 2
}

# Microseconds since the epoch, and tenths of seconds since a given such time, in plain bash.
now_us() { local t=${EPOCHREALTIME/[.,]/}; printf '%s' "$t"; }
since() {
  local d=$((($(now_us) - $1) / 100000))
  printf '%d.%d' $((d / 10)) $((d % 10))
}

# --- settings ---------------------------------------------------------------------------------

load_settings() {
  PREFIX=${CREDEX_CLUSTER_PREFIX:-credex}
  AMQP_PORT=${CREDEX_CLUSTER_AMQP_PORT:-5681}
  DIST_PORT=${CREDEX_CLUSTER_DIST_PORT:-25681}
  if [[ -f $CONF_FILE ]]; then
    local key value recorded_prefix='' recorded_amqp='' recorded_dist=''
    while IFS='=' read -r key value; do
      case $key in
        prefix) recorded_prefix=$value ;;
        amqp_port) recorded_amqp=$value ;;
        dist_port) recorded_dist=$value ;;
      esac
    done <"$CONF_FILE"
    [[ -n $recorded_prefix && -n $recorded_amqp && -n $recorded_dist ]] ||
      die "$CONF_FILE is incomplete; remove $BASE (after stopping any node it runs) and start again"
    if [[ $recorded_prefix != "$PREFIX" || $recorded_amqp != "$AMQP_PORT" || $recorded_dist != "$DIST_PORT" ]] &&
      [[ -n ${CREDEX_CLUSTER_PREFIX:-}${CREDEX_CLUSTER_AMQP_PORT:-}${CREDEX_CLUSTER_DIST_PORT:-} ]]; then
      say "note: $BASE was set up with nodes ${recorded_prefix}1-3, AMQP port $recorded_amqp and" \
        "distribution port $recorded_dist; using those (run stop first to change them)"
    fi
    PREFIX=$recorded_prefix AMQP_PORT=$recorded_amqp DIST_PORT=$recorded_dist
  fi
  [[ $PREFIX =~ ^[A-Za-z][A-Za-z0-9_-]*$ ]] ||
    die "CREDEX_CLUSTER_PREFIX must be a letter followed by letters, digits, _ or - (got '$PREFIX')"
  local port
  for port in "$AMQP_PORT" "$DIST_PORT"; do
    if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1024 || port > 65533)); then
      die "ports must be numbers from 1024 to 65533 (got '$port')"
    fi
  done
  ((AMQP_PORT + 2 < DIST_PORT || DIST_PORT + 2 < AMQP_PORT)) ||
    die "the AMQP ports ($AMQP_PORT-$((AMQP_PORT + 2))) and distribution ports ($DIST_PORT-$((DIST_PORT + 2))) overlap"
  if ! [[ $TIMEOUT =~ ^[0-9]+$ ]] || ((TIMEOUT == 0)); then
    die "CREDEX_CLUSTER_TIMEOUT must be a positive number of seconds (got '$TIMEOUT')"
  fi

  local i
  for i in "${NODES[@]}"; do
    NAME[i]=$PREFIX$i@localhost
    PORT[i]=$((AMQP_PORT + i - 1))
    DPORT[i]=$((DIST_PORT + i - 1))
    DIR[i]=$BASE/$PREFIX$i
    PIDFILE[i]=${DIR[i]}/$PREFIX$i.pid
    LOG[i]=${DIR[i]}/log/$PREFIX$i@localhost.log
  done
}

node_index() {  # N, or a node's name → 1, 2 or 3
  local i
  for i in "${NODES[@]}"; do
    if [[ $1 == "$i" || $1 == "${NAME[i]}" || $1 == "$PREFIX$i" ]]; then
      printf '%s' "$i"
      return 0
    fi
  done
  die "no node '$1': give 1, 2 or 3 (or ${NAME[1]} …)"
}

urls() {
  local i out=''
  for i in "${NODES[@]}"; do out+="${out:+,}amqp://guest:guest@127.0.0.1:${PORT[i]}/%2F"; done
  printf '%s\n' "$out"
}

# --- the distribution's tools, and who runs what ------------------------------------------------

setup_tools() {
  [[ -x $SERVER ]] || die "RabbitMQ is not installed ($SERVER is missing): apt-get install rabbitmq-server"
  CTL=$(command -v rabbitmqctl || true)
  [[ -n $CTL ]] || CTL=/usr/sbin/rabbitmqctl
  [[ -x $CTL ]] || die "rabbitmqctl is not installed (apt-get install rabbitmq-server)"
  RABBITMQ_HOME_DIR=$(getent passwd rabbitmq | cut -d: -f6) ||
    die "there is no rabbitmq user (the distribution's package creates it)"
  if [[ $(id -u) == 0 ]]; then
    AS_RABBITMQ=(runuser -u rabbitmq --)
  elif [[ $(id -un) == rabbitmq ]]; then
    AS_RABBITMQ=()
  else
    die "run this as root (or as rabbitmq): the nodes run as the rabbitmq user with its Erlang" \
      "cookie, and the distribution's rabbitmqctl only works for those two users"
  fi
}

# rabbitmqctl against node N, bounded in time.
ctl() {
  local i=$1
  shift
  timeout "$((TIMEOUT + 10))" "$CTL" -n "${NAME[i]}" "$@"
}

# --- processes and ports ------------------------------------------------------------------------

# Is PID the Erlang VM of the node named NAME? Its executable is beam.smp, it boots RabbitMQ
# (rabbitmqctl runs a beam.smp too) and its environment holds RABBITMQ_NODENAME=NAME, which this
# script sets.
is_node_vm() {
  local pid=$1 name=$2 exe
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ $exe == */beam.smp ]] || return 1
  # (grep without -q in these pipelines: it reads to the end, so no SIGPIPE fails them)
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -F -- ' -s rabbit boot ' >/dev/null || return 1
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -xF "RABBITMQ_NODENAME=$name" >/dev/null
}

# The OS pid of node N's VM, from its pid file (written by RabbitMQ at boot; stale after a
# SIGKILL), else by looking at every beam.smp process. Fails when the node does not run.
node_pid() {
  local i=$1 pid
  if [[ -f ${PIDFILE[i]} ]]; then
    pid=$(tr -dc '0-9' <"${PIDFILE[i]}")
    if is_node_vm "$pid" "${NAME[i]}"; then
      printf '%s' "$pid"
      return 0
    fi
  fi
  for pid in $(pgrep -x beam.smp || true); do
    if is_node_vm "$pid" "${NAME[i]}"; then
      printf '%s' "$pid"
      return 0
    fi
  done
  return 1
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

who_has_port() {
  if command -v ss >/dev/null; then ss -ltnpH "sport = :$1" 2>/dev/null | sed 's/^/    /' >&2 || true; fi
}

check_free() {  # N: its ports and its name must be free before it starts
  local i=$1 port
  for port in "${PORT[i]}" "${DPORT[i]}"; do
    if port_taken "$port"; then
      say "error: port $port, which ${NAME[i]} needs, is taken on 127.0.0.1:"
      who_has_port "$port"
      die "free it, or choose other ports with CREDEX_CLUSTER_AMQP_PORT / CREDEX_CLUSTER_DIST_PORT (after stop)"
    fi
  done
  if epmd -names 2>/dev/null | grep "^name $PREFIX$i at port " >/dev/null; then
    die "epmd already has a node named $PREFIX$i, but it is not the one this script runs from $BASE" \
      "(another CREDEX_CLUSTER_DIR?); choose another CREDEX_CLUSTER_PREFIX"
  fi
}

show_logs() {  # N
  local i=$1
  local startup=${DIR[i]}/log/startup.log
  if [[ -s $startup ]]; then
    if grep -qiE 'error|failed' "$startup"; then
      say "--- first errors in $startup:"
      grep -m 12 -iE 'error|failed' "$startup" >&2 || true
    fi
    say "--- last lines of $startup:"
    tail -n 8 "$startup" >&2
  fi
  if [[ -s ${LOG[i]} ]]; then
    say "--- last lines of ${LOG[i]}:"
    tail -n 25 "${LOG[i]}" >&2
  fi
  if [[ ! -s ${DIR[i]}/log/startup.log && ! -s ${LOG[i]} ]]; then
    say "(${NAME[i]} wrote no log in ${DIR[i]}/log)"
  fi
}

# --- the nodes' files ---------------------------------------------------------------------------

prepare_base() {
  if [[ ! -d $BASE ]]; then
    mkdir -p "$BASE"
    chmod 755 "$BASE"
  fi
  if ! "${AS_RABBITMQ[@]}" test -x "$BASE"; then
    [[ -f $CONF_FILE ]] || rmdir "$BASE" 2>/dev/null || true
    die "the rabbitmq user cannot reach $BASE: choose a CREDEX_CLUSTER_DIR it can reach (under /tmp, say)"
  fi
  if [[ ! -f $CONF_FILE ]]; then
    local epmd_ours=0
    epmd -names >/dev/null 2>&1 || epmd_ours=1
    {
      echo "# written by scripts/rabbitmq-cluster.sh start; removed by stop"
      echo "prefix=$PREFIX"
      echo "amqp_port=$AMQP_PORT"
      echo "dist_port=$DIST_PORT"
      echo "epmd_started_here=$epmd_ours"
    } >"$CONF_FILE"
  fi
}

write_node_files() {  # N
  local i=$1
  local d=${DIR[i]}
  mkdir -p "$d/log" "$d/mnesia"
  cat >"$d/rabbitmq.conf" <<EOF
# ${NAME[i]}, one of the three nodes of scripts/rabbitmq-cluster.sh (rewritten at each start)
listeners.tcp.default = 127.0.0.1:${PORT[i]}
loopback_users.guest = true
cluster_name = $PREFIX
log.file.level = info
log.console = false
EOF
  cat >"$d/rabbitmq-env.conf" <<EOF
# ${NAME[i]}: read instead of /etc/rabbitmq/rabbitmq-env.conf (whose NODENAME is the default
# node's). The rest of this node's settings are in its environment (see the script). Like the
# distribution's file: epmd and the Erlang distribution on loopback only.
ERL_EPMD_ADDRESS=127.0.0.1
EOF
  echo '[].' >"$d/enabled_plugins"
  if ((${#AS_RABBITMQ[@]})); then chown -R rabbitmq:rabbitmq "$d"; fi
  "${AS_RABBITMQ[@]}" test -w "$d/mnesia" ||
    die "the rabbitmq user cannot write to $d: choose a CREDEX_CLUSTER_DIR it can reach (under /tmp, say)"
}

launch_node() {  # N: start the node's VM in the background, in a session of its own
  local i=$1
  local d=${DIR[i]}
  write_node_files "$i"
  local env=(
    HOME="$RABBITMQ_HOME_DIR"
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    LANG=C.UTF-8
    RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf"
    RABBITMQ_NODENAME="${NAME[i]}"
    RABBITMQ_DIST_PORT="${DPORT[i]}"
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
    RABBITMQ_MNESIA_BASE="$d/mnesia"
    RABBITMQ_LOG_BASE="$d/log"
    RABBITMQ_PID_FILE="${PIDFILE[i]}"
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    ERL_CRASH_DUMP="$d/log/erl_crash.dump"
  )
  rm -f "${PIDFILE[i]}"
  (cd "$d" && exec setsid "${AS_RABBITMQ[@]}" env -i "${env[@]}" "$SERVER" \
    </dev/null >"$d/log/startup.log" 2>&1) &
  LAUNCHER[i]=$!
}

# Wait until node N accepts AMQP connections (its listener opens at the end of its boot).
wait_node_up() {
  local i=$1 started=$2 deadline=$((SECONDS + TIMEOUT))
  while ! { port_taken "${PORT[i]}" && node_pid "$i" >/dev/null; }; do
    if [[ -n ${LAUNCHER[i]:-} ]] && ! kill -0 "${LAUNCHER[i]}" 2>/dev/null; then
      say "error: ${NAME[i]} stopped while starting"
      show_logs "$i"
      die "${NAME[i]} did not start (its files are in ${DIR[i]}; stop removes them)"
    fi
    if ((SECONDS > deadline)); then
      say "error: ${NAME[i]} did not come up within $TIMEOUT s (CREDEX_CLUSTER_TIMEOUT)"
      show_logs "$i"
      die "${NAME[i]} is left as it is to look at; stop stops every node and removes the files"
    fi
    sleep 0.3
  done
  say "${NAME[i]} is up (AMQP 127.0.0.1:${PORT[i]}, pid $(node_pid "$i")) after $(since "$started") s"
}

# --- the cluster as a node sees it ----------------------------------------------------------------

json_nodes() {  # KEY: the node names in the JSON array "KEY":[…] on stdin
  grep -o "\"$1\":\[[^]]*\]" | grep -o '"[^"]*@[^"]*"' | tr -d '"' || true
}

cluster_json() { ctl "$1" -q cluster_status --formatter json 2>/dev/null; }

members_of() {  # JSON → every member's name, disc and RAM nodes
  { json_nodes disk_nodes <<<"$1"; json_nodes ram_nodes <<<"$1"; } | sort -u
}

is_member() {  # JSON NAME: is NAME a member of the cluster that JSON (cluster_status) describes?
  members_of "$1" | grep -xF "$2" >/dev/null
}

# Make node N a member of node SEED's cluster: stop_app, join_cluster, start_app. (join_cluster
# resets a node that has data of its own first.) A start_app that fails after the join (seen on a
# loaded machine: mnesia on the new member gives up while it copies the schema, "BOOT FAILED
# {mnesia_app,start}") is tried once more from a clean node: forget_cluster_node on the seed,
# reset, join_cluster, start_app.
join() {
  local i=$1 seed=$2
  say "joining ${NAME[i]} to ${NAME[seed]}'s cluster (stop_app, join_cluster, start_app)"
  ctl "$i" -q stop_app >/dev/null || die "rabbitmqctl -n ${NAME[i]} stop_app failed"
  if ! ctl "$i" -q join_cluster "${NAME[seed]}" >/dev/null; then
    show_logs "$i"
    die "rabbitmqctl -n ${NAME[i]} join_cluster ${NAME[seed]} failed"
  fi
  ctl "$i" -q start_app >/dev/null && return 0
  say "${NAME[i]} did not start after joining; resetting it and joining once more"
  ctl "$i" -q stop_app >/dev/null 2>&1 || true
  ctl "$seed" -q forget_cluster_node "${NAME[i]}" >/dev/null 2>&1 || true
  ctl "$i" -q reset >/dev/null 2>&1 || ctl "$i" -q force_reset >/dev/null 2>&1 || true
  if ! ctl "$i" -q join_cluster "${NAME[seed]}" >/dev/null; then
    show_logs "$i"
    die "rabbitmqctl -n ${NAME[i]} join_cluster ${NAME[seed]} failed"
  fi
  if ! ctl "$i" -q start_app >/dev/null; then
    show_logs "$i"
    die "rabbitmqctl -n ${NAME[i]} start_app failed"
  fi
}

missing_running() {  # JSON NAME…: the names that JSON (cluster_status) does not list as running
  local json=$1 name running
  shift
  running=$(json_nodes running_nodes <<<"$json")
  for name in "$@"; do
    grep -qxF "$name" <<<"$running" || printf ' %s' "$name"
  done
}

# Wait until node SEEN_FROM reports every node NAME… as running. JSON is a cluster_status of
# SEEN_FROM read just before, or '' to read one first.
wait_running() {
  local seen_from=$1 json=$2 deadline=$((SECONDS + TIMEOUT)) missing
  shift 2
  [[ -n $json ]] || json=$(cluster_json "$seen_from") || json=''
  while missing=$(missing_running "$json" "$@") && [[ -n $missing ]]; do
    if ((SECONDS > deadline)); then
      say "error: after $TIMEOUT s ${NAME[seen_from]} still does not see as running:$missing"
      say "cluster_status of ${NAME[seen_from]}:"
      ctl "$seen_from" cluster_status >&2 || true
      die "the cluster did not form; stop removes everything, start tries again"
    fi
    sleep 1
    json=$(cluster_json "$seen_from") || json=''
  done
}

# --- commands ---------------------------------------------------------------------------------------

# Start the given nodes that do not run, and wait until each is up. FRESH[N] tells whether
# node N started without data of its own (so it belongs to no cluster yet).
start_nodes() {
  local started=$1 i pid
  shift
  local launching=()
  for i in "$@"; do
    FRESH[i]=0
    if pid=$(node_pid "$i"); then
      say "${NAME[i]} runs already (pid $pid)"
    else
      check_free "$i"
      launching+=("$i")
    fi
  done
  ((${#launching[@]})) || return 0
  prepare_base
  for i in "${launching[@]}"; do
    [[ -d ${DIR[i]}/mnesia/${NAME[i]} ]] || FRESH[i]=1
    say "starting ${NAME[i]} (AMQP 127.0.0.1:${PORT[i]}, distribution ${DPORT[i]}, files in ${DIR[i]})"
    launch_node "$i"
  done
  for i in "${launching[@]}"; do wait_node_up "$i" "$started"; done
}

cmd_start() {
  local started json='' i joining=()
  started=$(now_us)
  start_nodes "$started" "${NODES[@]}"
  # Nodes 2 and 3 join node 1, unless they are members of its cluster already.
  if ((!FRESH[2] || !FRESH[3])); then
    json=$(cluster_json 1) || die "cannot read the cluster status of ${NAME[1]}"
  fi
  for i in 2 3; do
    if ((FRESH[i])) || ! is_member "$json" "${NAME[i]}"; then joining+=("$i"); fi
  done
  # One after the other: two joins at once made the second node's start_app fail now and then
  # (its mnesia met the first one's schema copy half done).
  for i in "${joining[@]}"; do join "$i" 1; done
  if ((${#joining[@]})); then json=''; fi
  wait_running 1 "$json" "${NAME[@]}"
  say "cluster of ${NAME[*]} running after $(since "$started") s"
  urls
}

cmd_start_node() {
  local i started j seed='' json
  i=$(node_index "$1")
  [[ -f $CONF_FILE ]] || die "no cluster in $BASE: run start first"
  started=$(now_us)
  start_nodes "$started" "$i"
  for j in "${NODES[@]}"; do
    if [[ $j != "$i" ]] && node_pid "$j" >/dev/null; then seed=$j && break; fi
  done
  if [[ -n $seed ]]; then
    json=$(cluster_json "$seed") || die "cannot read the cluster status of ${NAME[seed]}"
    if ((FRESH[i])) || ! is_member "$json" "${NAME[i]}"; then
      join "$i" "$seed"
      json=''
    fi
    wait_running "$seed" "$json" "${NAME[i]}" "${NAME[seed]}"
  fi
  say "${NAME[i]} is running in the cluster after $(since "$started") s"
}

cmd_kill() {
  local i pid deadline
  i=$(node_index "$1")
  pid=$(node_pid "$i") || die "${NAME[i]} does not run"
  kill -KILL "$pid"
  deadline=$((SECONDS + 10))
  while kill -0 "$pid" 2>/dev/null; do
    ((SECONDS < deadline)) || die "${NAME[i]} (pid $pid) is still there 10 s after SIGKILL"
    sleep 0.1
  done
  say "killed ${NAME[i]} (SIGKILL to its Erlang VM, pid $pid)"
}

cmd_stop() {
  if [[ ! -e $BASE ]]; then
    say "nothing to stop: $BASE does not exist"
    return 0
  fi
  [[ -f $CONF_FILE ]] ||
    die "$BASE has no cluster.conf, so it was not made by this script; not touching it"
  local i pid pids=() deadline epmd_ours=0
  for i in "${NODES[@]}"; do
    if pid=$(node_pid "$i"); then
      pids+=("$pid")
      say "stopping ${NAME[i]} (pid $pid)"
    fi
  done
  # SIGTERM makes RabbitMQ shut down cleanly; the data goes anyway.
  if ((${#pids[@]})); then kill -TERM "${pids[@]}" 2>/dev/null || true; fi
  deadline=$((SECONDS + TIMEOUT))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do
      if ((SECONDS > deadline)); then
        say "pid $pid did not stop within $TIMEOUT s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
      sleep 0.2
    done
  done
  grep -qx 'epmd_started_here=1' "$CONF_FILE" && epmd_ours=1
  rm -rf "$BASE"
  say "stopped; removed $BASE (the nodes' data, as after a reset, and their logs)"
  # An epmd that the first node started (none ran before) goes too once no node uses it;
  # epmd -kill refuses while any node is registered.
  if ((epmd_ours)) && ! epmd -names 2>/dev/null | grep '^name ' >/dev/null; then
    epmd -kill >/dev/null 2>&1 || true
  fi
}

cmd_status() {
  local i pid seen='' json all=0 vhost
  echo "nodes (files in $BASE):"
  for i in "${NODES[@]}"; do
    if pid=$(node_pid "$i"); then
      printf '  %s  %-24s running  pid %-7s AMQP 127.0.0.1:%s  distribution %s\n' \
        "$i" "${NAME[i]}" "$pid" "${PORT[i]}" "${DPORT[i]}"
      [[ -n $seen ]] || seen=$i
      all=$((all + 1))
    else
      printf '  %s  %-24s not running\n' "$i" "${NAME[i]}"
    fi
  done
  if [[ -z $seen ]]; then
    echo "no node runs"
    return 1
  fi
  json=$(cluster_json "$seen") || die "cannot read the cluster status of ${NAME[seen]}"
  echo "cluster, as ${NAME[seen]} sees it:"
  echo "  members: $(members_of "$json" | paste -sd ' ')"
  echo "  running: $(json_nodes running_nodes <<<"$json" | sort | paste -sd ' ')"
  echo "quorum queues (vhost, name, leader, members, online):"
  local vhosts
  vhosts=$(ctl "$seen" -q list_vhosts --no-table-headers name) || die "list_vhosts failed on ${NAME[seen]}"
  while IFS= read -r vhost; do
    [[ -n $vhost ]] || continue
    ctl "$seen" -q list_queues -p "$vhost" --no-table-headers name type leader members online |
      awk -F'\t' -v vhost="$vhost" '$2 == "quorum" { printf "  %s\t%s\t%s\t%s\t%s\n", vhost, $1, $3, $4, $5; n++ }
        END { if (!n) printf "  (none in %s)\n", vhost }'
  done <<<"$vhosts"
  ((all == ${#NODES[@]}))
}

cmd_leader() {
  local queue=$1 vhost=${2:-/} i seen='' leader
  for i in "${NODES[@]}"; do
    if node_pid "$i" >/dev/null; then seen=$i && break; fi
  done
  [[ -n $seen ]] || die "no node runs"
  leader=$(ctl "$seen" -q list_queues -p "$vhost" --no-table-headers name type leader |
    awk -F'\t' -v q="$queue" '$1 == q { print $2 " " $3 }') || die "list_queues failed on ${NAME[seen]}"
  [[ -n $leader ]] || die "no queue '$queue' in vhost '$vhost'"
  [[ ${leader%% *} == quorum ]] || die "'$queue' is a ${leader%% *} queue, not a quorum queue"
  leader=${leader#* }
  for i in "${NODES[@]}"; do
    if [[ $leader == "${NAME[i]}" ]]; then
      echo "$i"
      return 0
    fi
  done
  die "the leader of '$queue' is '$leader', not one of this cluster's nodes"
}

main() {
  [[ $# -ge 1 ]] || usage
  local command=$1
  shift
  case $command in
    start | stop | status | urls) [[ $# == 0 ]] || usage ;;
    kill | start-node) [[ $# == 1 ]] || usage ;;
    leader) [[ $# == 1 || $# == 2 ]] || usage ;;
    -h | --help | help) usage ;;
    *) usage ;;
  esac
  load_settings
  if [[ $command == urls ]]; then
    urls
    return 0
  fi
  setup_tools
  case $command in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    kill) cmd_kill "$1" ;;
    start-node) cmd_start_node "$1" ;;
    leader) cmd_leader "$@" ;;
  esac
}

main "$@"
