#!/usr/bin/env bash
# Build (and optionally push) the miras training image from vast/Dockerfile.
#
#   vast/build_image.sh IMAGE TAG [--push] [--base BASE_IMAGE] [--platform PLATFORM] [--dry-run]
#   vast/build_image.sh docker.io/you/miras 0.1.0 --push
#
# The build context is the repository root. --platform defaults to linux/amd64 (Vast's machines),
# also when building on an ARM laptop. --dry-run prints the docker commands without running them.
set -euo pipefail

usage="usage: vast/build_image.sh IMAGE TAG [--push] [--base BASE_IMAGE] [--platform PLATFORM] [--dry-run]"
fail() {
    echo "build_image.sh: error: $* ($usage)" >&2
    exit 2
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image="" tag="" push=0 base="" platform=linux/amd64 dry=0
while [ $# -gt 0 ]; do
    case $1 in
        --push) push=1 ;;
        --dry-run) dry=1 ;;
        --base | --platform)
            if [ $# -lt 2 ] || [ -z "$2" ]; then fail "$1 needs a value"; fi
            if [ "$1" = --base ]; then base=$2; else platform=$2; fi
            shift
            ;;
        -h | --help)
            echo "$usage"
            exit 0
            ;;
        -*) fail "unknown option '$1'" ;;
        *)
            if [ -z "$image" ]; then
                image=$1
            elif [ -z "$tag" ]; then
                tag=$1
            else
                fail "unexpected argument '$1'"
            fi
            ;;
    esac
    shift
done
[ -n "$image" ] || fail "IMAGE is missing (e.g. docker.io/you/miras)"
[ -n "$tag" ] || fail "TAG is missing (e.g. 0.1.0)"
if ! [[ $image =~ ^[a-z0-9]([a-z0-9._/:-]*[a-z0-9])?$ ]]; then
    fail "IMAGE '$image' is not a valid image name (lowercase, e.g. docker.io/you/miras, no tag)"
fi
if ! [[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
    fail "TAG '$tag' is not a valid tag (letters, digits, _ . -)"
fi

build=(docker build --platform "$platform" -f "$root/vast/Dockerfile" -t "$image:$tag")
if [ -n "$base" ]; then build+=(--build-arg "BASE_IMAGE=$base"); fi
build+=("$root")
run() {
    printf '%q ' "$@"
    echo
    if [ "$dry" = 0 ]; then
        "$@"
    fi
}
if [ "$dry" = 0 ] && ! command -v docker >/dev/null 2>&1; then
    echo "build_image.sh: error: docker is not installed (https://docs.docker.com/get-docker/)" >&2
    exit 1
fi
export DOCKER_BUILDKIT=1  # reads vast/Dockerfile.dockerignore
run "${build[@]}"
if [ "$push" = 1 ]; then
    run docker push "$image:$tag"
fi
