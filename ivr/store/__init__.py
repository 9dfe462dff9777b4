"""Redis: call state and transcripts, the call index, the reports queue, the cluster client,
failed sign-ins to the owner's pages."""
