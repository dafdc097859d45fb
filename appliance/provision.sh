#!/usr/bin/env bash
# Provision the amqproxy appliance on Debian 12: RabbitMQ (management + prometheus plugins, an
# own user, tuned config), amqproxy in a venv under /opt/amqproxy run by systemd, Toxiproxy
# (pinned, checksum-verified release) with the broker leg pre-created, Prometheus scraping the
# proxy, the Grafana dashboard files, tox for the test suite, and sysctl / ulimit tuning for
# many connections.
#
# Full mode (root, systemd; what `vagrant up` runs):
#     sudo appliance/provision.sh [--source DIR]
# Prefix mode (no apt-get, useradd, sysctl, rabbitmqctl or systemctl; nothing outside DIR is
# written; used by tests/appliance/):
#     appliance/provision.sh --prefix DIR [--source DIR]
#
# Both modes render the same templates from appliance/templates/ (paths prefixed with DIR in
# prefix mode) and are idempotent: a second run changes nothing and restarts nothing unless a
# file, the proxy's source or a package changed. See docs/DEPLOYMENT.md.
set -euo pipefail
set -o errtrace
shopt -s inherit_errexit

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
TEMPLATES=$SCRIPT_DIR/templates
ALL_STEPS=(tuning rabbitmq amqproxy toxiproxy prometheus grafana testtools)

# Toxiproxy: the official release archive (it holds toxiproxy-server and toxiproxy-cli), pinned
# by version and SHA-256. Another version or URL needs TOXIPROXY_SHA256 as well. The digest of
# toxiproxy_2.9.0_linux_amd64.tar.gz is the one recorded for that GitHub release asset in
# cashapp/hermit-packages (toxiproxy.hcl); when bumping, take the new one from the release's
# checksums.txt.
TOXIPROXY_PINNED_VERSION=2.9.0
TOXIPROXY_PINNED_SHA256_AMD64=4c0a4f538f2b85ff44b8ca82977f5d1e6ac874b60c9f216ad4c8269d36312b86
TOXIPROXY_API=127.0.0.1:8474
TOXIPROXY_BROKER_LISTEN=${TOXIPROXY_BROKER_LISTEN:-127.0.0.1:5674}

# Raised, never lowered, kernel and process limits.
WANT_FILE_MAX=2097152
WANT_NR_OPEN=1048576
RABBITMQ_NOFILE=65536

usage() {
    cat <<EOF
usage: $(basename "$0") [--prefix DIR] [--source DIR] [--only STEP,...] [--skip STEP,...]
                        [--listen HOST:PORT] [--http-listen HOST:PORT] [--upstream URL]

  --prefix DIR         install under DIR only: no packages, users, sysctl or services
  --source DIR         amqproxy checkout to install (default: $(dirname "$SCRIPT_DIR"))
  --only STEPS         run only these steps (comma-separated)
  --skip STEPS         skip these steps (comma-separated)
  --listen HOST:PORT   amqproxy AMQP address (default 0.0.0.0:5673)
  --http-listen H:P    amqproxy admin HTTP address (default 0.0.0.0:15673)
  --upstream URL       RabbitMQ node(s) for amqproxy (default amqp://127.0.0.1:5672)

steps: ${ALL_STEPS[*]}

environment:
  PYTHON                      interpreter for the venv (full mode: /usr/bin/python3, prefix: python3)
  TOXIPROXY_VERSION           Toxiproxy release (default $TOXIPROXY_PINNED_VERSION)
  TOXIPROXY_SHA256            SHA-256 of the archive; required unless the pinned release is used
  TOXIPROXY_URL               archive URL (https:// or file://; default: the GitHub release)
  TOXIPROXY_BROKER_LISTEN     listen address of Toxiproxy's broker proxy (default 127.0.0.1:5674)
  RABBITMQ_APPLIANCE_USER     RabbitMQ user created for applications (default amqproxy)
  RABBITMQ_APPLIANCE_PASSWORD its password (default: generated once, kept in
                              /etc/amqproxy/rabbitmq-appliance-user, mode 0600)
EOF
}

log() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}
CURRENT_STEP=setup
on_error() {
    printf 'ERROR: provisioning failed in step "%s" at line %s: %s\n' "$CURRENT_STEP" "$1" "$2" >&2
}
trap 'on_error "$LINENO" "$BASH_COMMAND"' ERR

# ------------------------------------------------------------------------------ arguments

PREFIX=""
PREFIX_MODE=0
SOURCE=$(dirname "$SCRIPT_DIR")
ONLY=""
SKIP=""
AMQP_LISTEN=0.0.0.0:5673
HTTP_LISTEN=0.0.0.0:15673
UPSTREAM=amqp://127.0.0.1:5672

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --prefix) need_value "$@" && PREFIX_MODE=1 && PREFIX=$2 && shift 2 ;;
    --source) need_value "$@" && SOURCE=$2 && shift 2 ;;
    --only) need_value "$@" && ONLY=$2 && shift 2 ;;
    --skip) need_value "$@" && SKIP=$2 && shift 2 ;;
    --listen) need_value "$@" && AMQP_LISTEN=$2 && shift 2 ;;
    --http-listen) need_value "$@" && HTTP_LISTEN=$2 && shift 2 ;;
    --upstream) need_value "$@" && UPSTREAM=$2 && shift 2 ;;
    -h | --help) usage && exit 0 ;;
    *) usage >&2 && die "unknown argument: $1" ;;
    esac
done

IFS=, read -ra listed <<<"$ONLY,$SKIP"
for step in "${listed[@]}"; do
    [[ -z $step || " ${ALL_STEPS[*]} " == *" $step "* ]] || die "unknown step '$step' (steps: ${ALL_STEPS[*]})"
done
want_step() {
    if [[ -n $ONLY && ",$ONLY," != *",$1,"* ]]; then return 1; fi
    if [[ ",$SKIP," == *",$1,"* ]]; then return 1; fi
    return 0
}

if ((PREFIX_MODE)); then
    mkdir -p -- "$PREFIX"
    PREFIX=$(cd -- "$PREFIX" && pwd -P)
    [[ $PREFIX != / ]] || die "--prefix / is the real system: run without --prefix (as root) instead"
else
    [[ $EUID -eq 0 ]] || die "full mode needs root (or use --prefix DIR)"
    [[ -d /run/systemd/system ]] || die "systemd is not running here: full mode needs it (or use --prefix DIR)"
    [[ -r /etc/debian_version ]] || die "full mode is for Debian (12, bookworm)"
    case $(cat /etc/debian_version) in
    12* | bookworm*) ;;
    *) warn "written for Debian 12; this is Debian $(cat /etc/debian_version)" ;;
    esac
fi
[[ -f $SOURCE/setup.py && -d $SOURCE/amqproxy ]] || die "--source $SOURCE is not an amqproxy checkout"
SOURCE=$(cd -- "$SOURCE" && pwd -P)

VENV=$PREFIX/opt/amqproxy
if ((PREFIX_MODE)); then PYTHON=${PYTHON:-python3}; else PYTHON=${PYTHON:-/usr/bin/python3}; fi
CACHE_DIR=$PREFIX/var/cache/amqproxy-appliance
WORK_DIR=""
cleanup() { if [[ -n $WORK_DIR && -d $WORK_DIR ]]; then rm -rf -- "$WORK_DIR"; fi; }
trap cleanup EXIT
mkdir -p -- "$PREFIX/var/tmp"
WORK_DIR=$(mktemp -d "$PREFIX/var/tmp/amqproxy-provision.XXXXXX")
if ((PREFIX_MODE)); then
    # Whatever the tools below write for themselves (python -m venv, pip and what they start:
    # caches, build trees, dot files in HOME) stays inside the prefix too. pip's per-user
    # config is therefore not read: configure pip with PIP_* variables or /etc/pip.conf.
    mkdir -p -- "$PREFIX/var/tmp/home" "$PREFIX/var/cache/pip"
    export HOME=$PREFIX/var/tmp/home TMPDIR=$PREFIX/var/tmp XDG_CACHE_HOME=$PREFIX/var/cache
    export XDG_CONFIG_HOME=$HOME/.config PIP_CACHE_DIR=${PIP_CACHE_DIR:-$PREFIX/var/cache/pip}
fi

# "host:port" for local clients of a listen address (0.0.0.0 / :: -> loopback).
local_address() {
    local host=${1%:*} port=${1##*:}
    case $host in
    "" | 0.0.0.0 | "*") host=127.0.0.1 ;;
    "[::]" | "::") host="[::1]" ;;
    esac
    printf '%s:%s\n' "$host" "$port"
}

# "host:port" of the first node of an amqp:// URL list.
first_node() {
    local node=${1%%,*}
    node=${node#*://}
    node=${node##*@}
    node=${node%%/*}
    node=${node%%\?*}
    [[ $node == *:* ]] || node+=:5672
    printf '%s\n' "$node"
}

# max of the kernel's current value (if readable) and ours.
at_least() {
    local current=0
    if [[ -r $1 ]]; then current=$(<"$1"); fi
    if [[ $current =~ ^[0-9]+$ ]] && ((current > $2)); then echo "$current"; else echo "$2"; fi
}

declare -A VARS=(
    [PREFIX]=$PREFIX
    [LISTEN]=$AMQP_LISTEN
    [HTTP_LISTEN]=$HTTP_LISTEN
    [UPSTREAM]=$UPSTREAM
    [AMQPROXY_METRICS_TARGET]=$(local_address "$HTTP_LISTEN")
    [TOXIPROXY_BROKER_LISTEN]=$TOXIPROXY_BROKER_LISTEN
    [TOXIPROXY_BROKER_UPSTREAM]=$(first_node "$UPSTREAM")
    [FILE_MAX]=$(at_least /proc/sys/fs/file-max "$WANT_FILE_MAX")
    [NR_OPEN]=$(at_least /proc/sys/fs/nr_open "$WANT_NR_OPEN")
    [RABBITMQ_NOFILE]=$RABBITMQ_NOFILE
)

# ------------------------------------------------------------------------------ helpers

# render TEMPLATE > stdout, replacing @NAME@ by VARS[NAME]; an unknown @NAME@ is an error.
render() {
    local content key
    content=$(<"$TEMPLATES/$1")
    for key in "${!VARS[@]}"; do
        content=${content//"@${key}@"/"${VARS[$key]}"}
    done
    if [[ $content =~ @[A-Z][A-Z0-9_]*@ ]]; then
        die "template $1: no value for ${BASH_REMATCH[0]}"
    fi
    printf '%s\n' "$content"
}

# install_file SRC DEST MODE [OWNER:GROUP]: put SRC at DEST atomically if the content differs;
# sets CHANGED=1 when it did. Owners are ignored in prefix mode.
CHANGED=0
install_file() {
    local src=$1 dest=$2 mode=$3 owner=${4:-root:root} tmp
    mkdir -p -- "$(dirname "$dest")"
    if [[ -f $dest ]] && cmp -s -- "$src" "$dest"; then
        note "unchanged  $dest"
    else
        tmp=$(mktemp "$(dirname "$dest")/.$(basename "$dest").XXXXXX")
        cat -- "$src" >"$tmp"
        chmod "$mode" "$tmp"
        if ((!PREFIX_MODE)); then chown "$owner" "$tmp"; fi
        mv -f -- "$tmp" "$dest"
        note "written    $dest"
        CHANGED=1
    fi
    chmod "$mode" "$dest"
    if ((!PREFIX_MODE)); then chown "$owner" "$dest"; fi
}

# install_template TEMPLATE DEST MODE [OWNER:GROUP]
install_template() {
    render "$1" >"$WORK_DIR/rendered"
    install_file "$WORK_DIR/rendered" "${@:2}"
}

# install_once TEMPLATE DEST MODE [OWNER:GROUP]: like install_template, but an existing DEST
# is the operator's and is left alone.
install_once() {
    if [[ -e $2 ]]; then
        note "kept       $2 (local settings file, never overwritten)"
    else
        install_template "$@"
    fi
}

APT_UPDATED=0
ensure_packages() {
    local pkg missing=()
    for pkg in "$@"; do
        # shellcheck disable=SC2016 # ${Status} is dpkg-query's format, not a shell variable
        if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        note "packages present: $*"
        return 0
    fi
    if ((PREFIX_MODE)); then
        note "prefix mode: not installing packages (${missing[*]})"
        return 0
    fi
    if ((!APT_UPDATED)); then
        apt-get update -q
        APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
}

# service_apply UNIT CHANGED: enable UNIT, restart it if CHANGED is 1, else start it.
service_apply() {
    if ((PREFIX_MODE)); then
        note "prefix mode: not enabling or starting $1"
        return 0
    fi
    systemctl enable --quiet "$1"
    if (($2)); then
        log "restarting $1"
        systemctl restart "$1"
    else
        systemctl start "$1"
    fi
}

daemon_reload() {
    if ((!PREFIX_MODE)); then systemctl daemon-reload; fi
}

# wait_for TIMEOUT DESCRIPTION COMMAND...: poll COMMAND once a second.
wait_for() {
    local timeout=$1 what=$2 i
    shift 2
    for ((i = 0; i < timeout; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    die "$what: not ready after ${timeout}s"
}

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" || true; }

# amqproxy is ready when /readyz answers 200; a proxy without /readyz (404) when /healthz does.
amqproxy_ready() {
    local base code
    base="http://$(local_address "$HTTP_LISTEN")"
    code=$(http_code "$base/readyz")
    if [[ $code == 200 ]]; then return 0; fi
    [[ $code == 404 && $(http_code "$base/healthz") == 200 ]]
}

# shellcheck disable=SC2016 # $1 and $2 are the inner shell's arguments
tcp_open() { timeout 2 bash -c ': >"/dev/tcp/$1/$2"' _ "${1%:*}" "${1##*:}"; }

# ------------------------------------------------------------------------------ steps

step_tuning() {
    install_template sysctl.conf.in "$PREFIX/etc/sysctl.d/60-amqproxy-appliance.conf" 0644
    local sysctl_changed=$CHANGED
    install_template limits.conf.in "$PREFIX/etc/security/limits.d/60-amqproxy-appliance.conf" 0644
    if ((PREFIX_MODE)); then
        note "prefix mode: not applying sysctl settings"
    elif ((sysctl_changed)); then
        sysctl -q -p "$PREFIX/etc/sysctl.d/60-amqproxy-appliance.conf"
    fi
}

rabbitmq_ready() {
    rabbitmq-diagnostics -q check_running && rabbitmq-diagnostics -q check_port_connectivity
}

step_rabbitmq() {
    ensure_packages rabbitmq-server
    CHANGED=0
    install_template rabbitmq.conf.in "$PREFIX/etc/rabbitmq/rabbitmq.conf" 0644 root:rabbitmq
    install_template rabbitmq-enabled_plugins "$PREFIX/etc/rabbitmq/enabled_plugins" 0644 rabbitmq:rabbitmq
    install_template rabbitmq-server.override.conf.in \
        "$PREFIX/etc/systemd/system/rabbitmq-server.service.d/60-amqproxy-appliance.conf" 0644
    if ((PREFIX_MODE)); then
        note "prefix mode: not restarting RabbitMQ or creating its user"
        return 0
    fi
    daemon_reload
    service_apply rabbitmq-server.service "$CHANGED"
    wait_for 180 "RabbitMQ" rabbitmq_ready

    local user=${RABBITMQ_APPLIANCE_USER:-amqproxy} password=${RABBITMQ_APPLIANCE_PASSWORD:-}
    local secret=$PREFIX/etc/amqproxy/rabbitmq-appliance-user users
    if [[ -z $password && -r $secret ]]; then
        password=$(sed -n 's/^password=//p' "$secret")
    fi
    if [[ -z $password ]]; then
        password=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    fi
    printf 'user=%s\npassword=%s\n' "$user" "$password" >"$WORK_DIR/secret"
    install_file "$WORK_DIR/secret" "$secret" 0600
    users=$(rabbitmqctl -q list_users --no-table-headers)
    if awk -v u="$user" '$1 == u { found = 1 } END { exit !found }' <<<"$users"; then
        rabbitmqctl -q change_password "$user" "$password"
    else
        rabbitmqctl -q add_user "$user" "$password"
    fi
    rabbitmqctl -q set_user_tags "$user" administrator
    rabbitmqctl -q set_permissions -p / "$user" '.*' '.*' '.*'
    note "RabbitMQ user '$user' (password in $secret)"
}

# Hash of the files pip builds the package from, to skip an unchanged reinstall.
stage_source() {
    local stage=$WORK_DIR/src f
    mkdir -p -- "$stage"
    for f in setup.py setup.cfg pyproject.toml README.md LICENSE MANIFEST.in; do
        if [[ -f $SOURCE/$f ]]; then cp -p -- "$SOURCE/$f" "$stage/"; fi
    done
    tar -C "$SOURCE" --exclude=__pycache__ --exclude='*.pyc' -cf - amqproxy | tar -C "$stage" -xf -
    (cd "$stage" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}

step_amqproxy() {
    # gcc and the headers compile the data path with Cython (setup.py); without them pip installs
    # the pure-Python modules, which behave the same.
    ensure_packages python3 python3-venv python3-dev gcc curl ca-certificates
    if ((!PREFIX_MODE)) && ! getent passwd amqproxy >/dev/null; then
        log "creating system user amqproxy"
        useradd --system --user-group --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin amqproxy
    fi
    ((PREFIX_MODE)) || note "user amqproxy present"

    local restart=0 hash want_version have_version=""
    # The venv: recreated when its interpreter is gone or is another Python version.
    want_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ -x $VENV/bin/python ]]; then
        have_version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
    fi
    if [[ $have_version != "$want_version" ]]; then
        log "creating venv $VENV (Python $want_version)"
        "$PYTHON" -m venv --clear "$VENV"
        rm -f -- "$VENV/.amqproxy-source.sha256"
    fi

    hash=$(stage_source)
    if [[ -f $VENV/.amqproxy-source.sha256 && $(<"$VENV/.amqproxy-source.sha256") == "$hash" ]] &&
        "$VENV/bin/amqproxy" --help >/dev/null 2>&1; then
        note "unchanged  $VENV (amqproxy from $SOURCE, source sha256 ${hash:0:12})"
    else
        log "pip install amqproxy from $SOURCE into $VENV"
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
            "$VENV/bin/python" -m pip install -q --upgrade "$WORK_DIR/src"
        "$VENV/bin/amqproxy" --help >/dev/null
        printf '%s\n' "$hash" >"$VENV/.amqproxy-source.sha256"
        restart=1
    fi
    if ((!PREFIX_MODE)); then chown -R root:root "$VENV"; fi

    CHANGED=0
    install_template amqproxy.conf.in "$PREFIX/etc/amqproxy/amqproxy.conf" 0640 root:amqproxy
    install_once amqproxy.default.in "$PREFIX/etc/default/amqproxy" 0644
    install_template amqproxy.service.in "$PREFIX/etc/systemd/system/amqproxy.service" 0644
    ((CHANGED)) && restart=1
    daemon_reload
    service_apply amqproxy.service "$restart"
    if ((!PREFIX_MODE)); then
        wait_for 60 "amqproxy (http://$(local_address "$HTTP_LISTEN")/readyz)" amqproxy_ready
        wait_for 10 "amqproxy AMQP port $(local_address "$AMQP_LISTEN")" tcp_open "$(local_address "$AMQP_LISTEN")"
        note "amqproxy ready on $AMQP_LISTEN (admin http://$HTTP_LISTEN)"
    fi
}

step_toxiproxy() {
    ensure_packages curl ca-certificates
    local arch version sha url archive tmp server cli changed
    arch=$(uname -m)
    case $arch in
    x86_64 | amd64) arch=amd64 ;;
    aarch64 | arm64) arch=arm64 ;;
    esac
    version=${TOXIPROXY_VERSION:-$TOXIPROXY_PINNED_VERSION}
    url=${TOXIPROXY_URL:-https://github.com/Shopify/toxiproxy/releases/download/v$version/toxiproxy_${version}_linux_$arch.tar.gz}
    if [[ -n ${TOXIPROXY_SHA256:-} ]]; then
        sha=$TOXIPROXY_SHA256
    elif [[ $version == "$TOXIPROXY_PINNED_VERSION" && $arch == amd64 && -z ${TOXIPROXY_URL:-} ]]; then
        sha=$TOXIPROXY_PINNED_SHA256_AMD64
    else
        die "no pinned SHA-256 for Toxiproxy $version linux/$arch${TOXIPROXY_URL:+ from $TOXIPROXY_URL}: set TOXIPROXY_SHA256"
    fi
    sha=${sha,,}
    [[ $sha =~ ^[0-9a-f]{64}$ ]] || die "TOXIPROXY_SHA256 is not a SHA-256 hex digest: $sha"

    archive=$CACHE_DIR/$(basename "${url%%\?*}")
    mkdir -p -- "$CACHE_DIR"
    if [[ -f $archive ]] && [[ $(sha256sum <"$archive" | cut -d' ' -f1) == "$sha" ]]; then
        note "cached     $archive (sha256 verified)"
    else
        log "downloading $url"
        tmp=$(mktemp "$archive.XXXXXX")
        if ! curl -fsSL --proto '=https,file' --proto-redir '=https' --retry 3 --connect-timeout 20 -o "$tmp" "$url"; then
            rm -f -- "$tmp"
            die "cannot download $url"
        fi
        local got
        got=$(sha256sum <"$tmp" | cut -d' ' -f1)
        if [[ $got != "$sha" ]]; then
            rm -f -- "$tmp"
            die "Toxiproxy archive checksum mismatch for $url: expected sha256 $sha, got $got; nothing installed"
        fi
        mv -f -- "$tmp" "$archive"
        note "verified   $archive (sha256 $sha)"
    fi

    mkdir -p -- "$WORK_DIR/toxiproxy"
    tar -xzf "$archive" -C "$WORK_DIR/toxiproxy"
    server=$(find "$WORK_DIR/toxiproxy" -type f -name toxiproxy-server | head -n 1)
    cli=$(find "$WORK_DIR/toxiproxy" -type f -name toxiproxy-cli | head -n 1)
    [[ -n $server && -n $cli ]] || die "$archive holds no toxiproxy-server and toxiproxy-cli"

    CHANGED=0
    install_file "$server" "$PREFIX/usr/local/bin/toxiproxy-server" 0755
    install_file "$cli" "$PREFIX/usr/local/bin/toxiproxy-cli" 0755
    install_template toxiproxy-proxies.json.in "$PREFIX/etc/toxiproxy/proxies.json" 0644
    install_template toxiproxy.service.in "$PREFIX/etc/systemd/system/toxiproxy.service" 0644
    changed=$CHANGED
    daemon_reload
    service_apply toxiproxy.service "$changed"
    if ((!PREFIX_MODE)); then
        wait_for 30 "Toxiproxy API http://$TOXIPROXY_API" curl -fsS "http://$TOXIPROXY_API/proxies/rabbitmq"
        note "Toxiproxy $version: API http://$TOXIPROXY_API, proxy 'rabbitmq' $TOXIPROXY_BROKER_LISTEN -> $(first_node "$UPSTREAM")"
    fi
}

step_prometheus() {
    ensure_packages prometheus
    render prometheus.yml.in >"$WORK_DIR/prometheus.yml"
    if command -v promtool >/dev/null 2>&1; then
        promtool check config --syntax-only "$WORK_DIR/prometheus.yml" >/dev/null ||
            die "promtool rejects the rendered prometheus.yml"
    elif ((!PREFIX_MODE)); then
        die "promtool not found (package prometheus)"
    fi
    CHANGED=0
    install_file "$WORK_DIR/prometheus.yml" "$PREFIX/etc/prometheus/prometheus.yml" 0644
    service_apply prometheus.service "$CHANGED"
    if ((!PREFIX_MODE)); then
        wait_for 60 "Prometheus" curl -fsS http://127.0.0.1:9090/-/ready
        note "Prometheus on :9090 scraping amqproxy at ${VARS[AMQPROXY_METRICS_TARGET]}"
    fi
}

# The dashboard and Grafana provisioning files always land under /usr/local/share; they are
# wired into Grafana only where Grafana is installed (it is not part of the appliance).
step_grafana() {
    local share=$PREFIX/usr/local/share/amqproxy/grafana
    CHANGED=0
    install_file "$SCRIPT_DIR/grafana/amqproxy-dashboard.json" "$share/amqproxy-dashboard.json" 0644
    install_file "$SCRIPT_DIR/grafana/provisioning/datasources/amqproxy.yaml" \
        "$share/provisioning/datasources/amqproxy.yaml" 0644
    install_file "$SCRIPT_DIR/grafana/provisioning/dashboards/amqproxy.yaml" \
        "$share/provisioning/dashboards/amqproxy.yaml" 0644
    if [[ ! -d $PREFIX/etc/grafana/provisioning ]]; then
        note "Grafana not installed: dashboard left in $share (see docs/DEPLOYMENT.md)"
        return 0
    fi
    CHANGED=0
    install_file "$SCRIPT_DIR/grafana/provisioning/datasources/amqproxy.yaml" \
        "$PREFIX/etc/grafana/provisioning/datasources/amqproxy.yaml" 0644 root:grafana
    install_file "$SCRIPT_DIR/grafana/provisioning/dashboards/amqproxy.yaml" \
        "$PREFIX/etc/grafana/provisioning/dashboards/amqproxy.yaml" 0644 root:grafana
    install_file "$SCRIPT_DIR/grafana/amqproxy-dashboard.json" \
        "$PREFIX/var/lib/grafana/dashboards/amqproxy/amqproxy-dashboard.json" 0644 root:grafana
    service_apply grafana-server.service "$CHANGED"
}

# tox, to run the repository's test suite inside the VM against the appliance's broker
# (127.0.0.1:5672, guest/guest) and Toxiproxy: `cd /vagrant && tox`.
step_testtools() {
    ensure_packages tox
}

# ------------------------------------------------------------------------------ main

if ((PREFIX_MODE)); then
    log "prefix mode: installing under $PREFIX (no packages, users, sysctl or services)"
else
    log "full mode: provisioning this Debian host"
fi
note "source $SOURCE"
for step in "${ALL_STEPS[@]}"; do
    if want_step "$step"; then
        CURRENT_STEP=$step
        log "step $step"
        "step_$step"
    fi
done
CURRENT_STEP=finished
log "done"
if ((!PREFIX_MODE)); then
    note "AMQP via amqproxy   amqp://<user>:<password>@$(local_address "$AMQP_LISTEN")/"
    note "amqproxy admin      http://$(local_address "$HTTP_LISTEN")/metrics"
    note "logs                journalctl -u amqproxy -o cat"
fi
