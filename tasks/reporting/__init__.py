"""What the report stage draws and prints: plots, the reward-at-matched-KL table, console and markdown summaries."""
