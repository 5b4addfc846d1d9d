#!/usr/bin/env bash
# Draw the README's two pictures with dozero itself, from a real training run:
#   docs/images/loss.png       the loss curve of `dozero train` (shakespeare-char, 2,000 steps; ~3 min on a laptop CPU)
#   docs/images/attention.png  `dozero attention` on that trained model
# Usage (from anywhere): docs/make_images.sh          RUN=runs/other docs/make_images.sh reuses a finished run.
set -euo pipefail
cd "$(dirname "$0")/.."
DOZERO=${DOZERO:-.venv/bin/dozero}
RUN=${RUN:-runs/readme-shakespeare-char}
if [ ! -f "$RUN/best/model.safetensors" ]; then
    "$DOZERO" train --out-dir "$RUN"
fi
mkdir -p docs/images
cp "$RUN/loss.png" docs/images/loss.png
"$DOZERO" attention --model "$RUN" "To be, or not to be: that is the question." --token question \
    --out docs/images/attention.png
ls -l docs/images/
