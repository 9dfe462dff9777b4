"""Redis: call state and transcripts, the call index, the reports queue, the cluster client."""
