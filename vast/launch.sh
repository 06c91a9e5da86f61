#!/usr/bin/env bash
# Create a Vast.ai instance that sets itself up and trains (vast/entrypoint.sh as its on-start command).
#
#   vast/launch.sh OFFER_ID (--image IMAGE | --repo GIT_URL [--ref REF]) [--disk GB] [--label LABEL]
#                  [--bid PRICE] [--dry-run]
#
# OFFER_ID comes from `vastai search offers` (an offer is a machine for rent; the instance id is
# what `vastai create instance` returns). --image: an image built by vast/build_image.sh (on-start
# `bash /opt/miras/vast/entrypoint.sh`); --repo: a stock PyTorch image that clones the repository
# into /workspace/miras at first start. --disk: GB of local disk (default: what `miras estimate`
# computes for MIRAS_TRAIN_ARGS; Vast cannot grow a disk later). --bid: an interruptible instance
# at PRICE $/hour. --dry-run prints the command, secrets masked, without running it.
#
# Environment variables are taken from YOUR shell, only those that are set, never from a file in the
# repository: WANDB_API_KEY WANDB_PROJECT WANDB_ENTITY WANDB_MODE HF_TOKEN
# GDRIVE_SERVICE_ACCOUNT_JSON_B64 MIRAS_GDRIVE_FOLDER_ID MIRAS_GDRIVE_SHARED_DRIVE_ID MIRAS_GDRIVE_REMOTE
# MIRAS_TRAIN_ARGS MIRAS_TRAIN_CMD MIRAS_EXTRAS AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL
# AWS_DEFAULT_REGION, and every RCLONE_CONFIG_* variable.
set -euo pipefail

usage="usage: vast/launch.sh OFFER_ID (--image IMAGE | --repo GIT_URL [--ref REF]) [--disk GB] [--label LABEL] [--bid PRICE] [--dry-run]"
fail() {
    echo "launch.sh: error: $* ($usage)" >&2
    exit 2
}

offer="" image="" repo="" ref="" disk="" label="" bid="" dry=0
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry=1 ;;
        --image | --repo | --ref | --disk | --label | --bid)
            if [ $# -lt 2 ] || [ -z "$2" ]; then fail "$1 needs a value"; fi
            case $1 in
                --image) image=$2 ;;
                --repo) repo=$2 ;;
                --ref) ref=$2 ;;
                --disk) disk=$2 ;;
                --label) label=$2 ;;
                --bid) bid=$2 ;;
            esac
            shift
            ;;
        -h | --help)
            echo "$usage"
            exit 0
            ;;
        -*) fail "unknown option '$1'" ;;
        *)
            if [ -n "$offer" ]; then fail "unexpected argument '$1'"; fi
            offer=$1
            ;;
    esac
    shift
done

[ -n "$offer" ] || fail "OFFER_ID is missing (a number from 'vastai search offers')"
[[ $offer =~ ^[0-9]+$ ]] || fail "OFFER_ID '$offer' is not a number (an offer id from 'vastai search offers')"
if [ -n "$image" ] && [ -n "$repo" ]; then fail "give --image or --repo, not both"; fi
if [ -z "$image" ] && [ -z "$repo" ]; then fail "give --image IMAGE (built by vast/build_image.sh) or --repo GIT_URL"; fi
if [ -n "$ref" ] && [ -z "$repo" ]; then fail "--ref needs --repo"; fi
if [ -n "$bid" ] && ! [[ $bid =~ ^[0-9]*\.?[0-9]+$ ]]; then fail "--bid '$bid' is not a price (\$/hour, e.g. 0.45)"; fi
if [ -n "$repo" ] && [[ $repo =~ [[:space:]\'\"\;\&\|\$\`] ]]; then fail "--repo '$repo' is not a plain git URL"; fi
if [ -n "$ref" ] && ! [[ $ref =~ ^[A-Za-z0-9._/-]+$ ]]; then fail "--ref '$ref' is not a branch, tag or commit"; fi

if [ -z "$disk" ]; then
    if disk=$(python3 -m miras.estimate --train-args "${MIRAS_TRAIN_ARGS:-}" --field disk_gb 2>/dev/null); then
        echo "launch.sh: --disk $disk (from miras estimate for MIRAS_TRAIN_ARGS)" >&2
    else
        fail "--disk is missing and 'python3 -m miras.estimate' is not available here (pass --disk GB)"
    fi
fi
if ! [[ $disk =~ ^[0-9]+$ ]] || [ "$disk" -lt 10 ]; then fail "--disk '$disk' is not a whole number of GB >= 10"; fi

if [ -n "$repo" ]; then
    image=${MIRAS_BASE_IMAGE:-pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime}
    clone="git clone --quiet $repo /workspace/miras"
    if [ -n "$ref" ]; then clone="$clone && git -C /workspace/miras checkout --quiet $ref"; fi
    onstart="[ -d /workspace/miras ] || { (command -v git >/dev/null || (apt-get update -qq && apt-get install -y -qq git)) && $clone; }; bash /workspace/miras/vast/entrypoint.sh"
else
    onstart="bash /opt/miras/vast/entrypoint.sh"
fi

# Vast's --env is one string in docker flag form; it splits on spaces outside double quotes, so values
# are double-quoted and may not contain a double quote themselves.
names=(WANDB_API_KEY WANDB_PROJECT WANDB_ENTITY WANDB_MODE HF_TOKEN
    GDRIVE_SERVICE_ACCOUNT_JSON_B64 MIRAS_GDRIVE_FOLDER_ID MIRAS_GDRIVE_SHARED_DRIVE_ID MIRAS_GDRIVE_REMOTE
    MIRAS_TRAIN_ARGS MIRAS_TRAIN_CMD MIRAS_EXTRAS
    AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL AWS_DEFAULT_REGION)
while IFS= read -r name; do names+=("$name"); done < <(compgen -e | grep '^RCLONE_CONFIG_' || true)
env_flags="" shown_flags=""
for name in "${names[@]}"; do
    value=${!name:-}
    [ -n "$value" ] || continue
    case $value in
        *'"'* | *$'\n'*) fail "\$$name holds a double quote or a newline, which Vast's --env cannot carry" ;;
    esac
    env_flags+=" -e $name=\"$value\""
    case $name in
        *KEY* | *SECRET* | *TOKEN* | *PASS* | *B64* | *CREDENTIAL*) shown_flags+=" -e $name=\"***\"" ;;
        *) shown_flags+=" -e $name=\"$value\"" ;;
    esac
done

cmd=(vastai create instance "$offer" --image "$image" --disk "$disk" --ssh --direct --onstart-cmd "$onstart")
if [ -n "$label" ]; then cmd+=(--label "$label"); fi
if [ -n "$bid" ]; then cmd+=(--bid_price "$bid"); fi
shown=("${cmd[@]}")
if [ -n "$env_flags" ]; then
    cmd+=(--env "${env_flags# }")
    shown+=(--env "${shown_flags# }")
fi

# Shell-quotes one word for display: as is when plain, else in single quotes.
quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}
if [ "$dry" = 1 ]; then
    line=""
    for word in "${shown[@]}"; do line+="$(quote "$word") "; done
    echo "${line% }"
    exit 0
fi
if ! command -v vastai >/dev/null 2>&1; then
    echo "launch.sh: error: the vastai CLI is not installed (pip install vastai; vastai set api-key ...)" >&2
    exit 1
fi
echo "launch.sh: creating an instance from offer $offer (image $image, disk $disk GB)" >&2
"${cmd[@]}"
