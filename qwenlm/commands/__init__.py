"""One module per `qwen` command, plus the options they share."""
