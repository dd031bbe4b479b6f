"""The data layer shared by every trainer: records, readers, tokenization and collation."""
