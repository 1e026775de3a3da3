# Shell functions a running node uses to talk to bootd (sourced by /sbin/init).
# Needs BOOTD_URL, BOOTD_NODE and BOOTD_TOKEN in the environment. busybox wget only.

_bootd_json_string() { # escape for a JSON string: drop quotes, backslashes and control characters
    printf '%s' "$1" | tr -d '"\\' | tr -d '\000-\037'
}

bootd_post() { # PATH JSON: POST to /api/v1/nodes/$BOOTD_NODE/PATH; status 0 on a 2xx answer
    [ -n "${BOOTD_URL:-}" ] && [ -n "${BOOTD_NODE:-}" ] || return 1
    timeout 10 wget -q -O /dev/null \
        --header "X-Bootd-Token: ${BOOTD_TOKEN:-}" \
        --header "Content-Type: application/json" \
        --post-data "$2" \
        "$BOOTD_URL/api/v1/nodes/$BOOTD_NODE/$1"
}

bootd_event() { # STATE [REASON]
    bootd_post events "{\"event\":\"$(_bootd_json_string "$1")\",\"reason\":\"$(_bootd_json_string "${2:-}")\"}"
}

bootd_heartbeat() {
    bootd_post heartbeat '{}'
}
