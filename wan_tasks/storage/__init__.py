"""Object storage: S3 archiving and the embedded SeaweedFS default."""
