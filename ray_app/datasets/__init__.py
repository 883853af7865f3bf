"""From a collection (or captured conversations) to a fine-tuning set: domain detection, summaries and
instruction pairs written by a teacher model through the server's own API, then quality filters."""
