"""Generated from protos/ by scripts/gen_protos.sh. DO NOT EDIT."""
