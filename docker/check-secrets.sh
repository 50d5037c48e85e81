#!/bin/sh
# Every service starts through this script: it refuses to run the service while any environment
# variable still holds a placeholder (change-me, as an older docker/.env.example shipped them, or
# changeme), names the variables, and otherwise execs its arguments. Compose's `${VAR:?}` already
# stops a stack with an unset or empty secret; interpolation cannot match patterns, hence this check.
# Values are never printed. Exit status 78 (EX_CONFIG): a configuration error, not a crash.
set -eu

if [ "$#" -eq 0 ]; then
  echo "check-secrets: no command to run" >&2
  exit 64
fi

found=""
# Names only: `env` prints NAME=value lines; a line that belongs to a multi-line value yields a name
# that is either unset (empty, harmless) or a real variable checked twice.
for name in $(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p'); do
  eval "value=\${$name-}"
  case "$value" in
    *[Cc][Hh][Aa][Nn][Gg][Ee]-[Mm][Ee]* | *[Cc][Hh][Aa][Nn][Gg][Ee][Mm][Ee]*)
      case " $found " in
        *" $name "*) ;;
        *) found="${found:+$found }$name" ;;
      esac ;;
  esac
done

if [ -n "$found" ]; then
  echo "check-secrets: refusing to start: placeholder (change-me) value in $found." >&2
  echo "check-secrets: put real secrets in docker/.env (see docker/.env.example), then: docker compose up -d" >&2
  exit 78
fi

exec "$@"
