"""Quality measures: paired image metrics and mask/nodule statistics."""
