#!/usr/bin/env bash
# Install the peers into virtual environments of their own (never into rayflow's):
#   benchmarks/peers/.venv-bytewax  bytewax (Rust core, Python API), with confluent-kafka
#                                   for its Kafka connectors (the version rayflow uses)
#   benchmarks/peers/.venv-flink    apache-flink (PyFlink DataStream API; needs Java 17)
# Usage: bash benchmarks/peers/setup_peers.sh [bytewax|flink]...
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
want=("${@:-bytewax flink}")
for peer in ${want[@]}; do
  venv="$here/.venv-$peer"
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  case "$peer" in
    bytewax) "$venv/bin/python" -m pip install -q "bytewax==0.21.1" "confluent-kafka==2.16.1" psutil ;;
    flink)
      command -v java >/dev/null || { echo "PyFlink needs Java 17 on PATH" >&2; exit 1; }
      "$venv/bin/python" -m pip install -q "apache-flink==2.3.0" psutil ;;
    *) echo "unknown peer: $peer" >&2; exit 2 ;;
  esac
  echo "$peer: $("$venv/bin/python" -m pip show "${peer/flink/apache-flink}" | grep ^Version)"
done
