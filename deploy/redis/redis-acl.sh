#!/bin/sh
# Write the ACL file Redis loads (`redis-server --aclfile OUT`) from the rules in RULES
# (deploy/redis/redis-acl.conf): each `user NAME on ...` line gets its password as its SHA-256
# (`#<hex>`), so the file holds no password and any character goes in one. The password is the
# file PASSWORDS/redis-password-<name> when PASSWORDS (a directory: Kubernetes mounts the Secret
# there) is given, else the environment variable REDIS_PASSWORD_<NAME> (upper case: compose).
# A user whose password is missing or empty is written `off` (it cannot log in), and said so on
# stderr. Comments and blank lines are dropped: Redis's ACL file has none. Written 0600.
#
#   REDIS_PASSWORD_BROKER=... REDIS_PASSWORD_WORKER=... REDIS_PASSWORD_CLIENT=... \
#       sh deploy/redis/redis-acl.sh deploy/redis/redis-acl.conf /tmp/users.acl
#   sh deploy/redis/redis-acl.sh deploy/redis/redis-acl.conf /tmp/users.acl /etc/redis-passwords
set -eu
rules=$1
out=$2
passwords=${3:-}
umask 077
tmp="$out.tmp"
: >"$tmp"
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
    '' | '#'*) continue ;;
    'user '*) ;;
    *)
        echo "redis-acl.sh: $rules: not a user line: $line" >&2
        exit 1
        ;;
    esac
    set -f # a rule's `*` and `?` are patterns for Redis, not for this shell
    # shellcheck disable=SC2086
    set -- $line
    set +f
    name=$2
    shift 2
    case " $* " in
    *' on '*) ;;
    *)
        printf '%s\n' "$line" >>"$tmp" # off, or no password needed (`nopass`): as written
        continue
        ;;
    esac
    case "$name" in
    *[!a-z0-9_]* | '')
        echo "redis-acl.sh: user name $name: letters, digits and _ only" >&2
        exit 1
        ;;
    esac
    if [ -n "$passwords" ]; then
        source="$passwords/redis-password-$name"
        password=$(cat "$source" 2>/dev/null || true) # a trailing newline is dropped
        missing="$source is missing or empty"
    else
        source=REDIS_PASSWORD_$(printf '%s' "$name" | tr 'a-z' 'A-Z')
        eval "password=\${$source:-}"
        missing="$source is not set"
    fi
    if [ -z "$password" ]; then
        echo "redis-acl.sh: $missing: user $name is off" >&2
        printf 'user %s off resetpass\n' "$name" >>"$tmp"
        continue
    fi
    hash=$(printf '%s' "$password" | sha256sum | cut -d' ' -f1)
    printf 'user %s reset #%s %s\n' "$name" "$hash" "$*" >>"$tmp"
done <"$rules"
mv "$tmp" "$out"
