"""The shipped container image, built and run the way deploy/kubernetes runs it (`make test-image`)."""
