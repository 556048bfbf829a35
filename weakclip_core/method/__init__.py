"""The method's steps outside the networks: CAM fusion, seeds from CAMs, losses, dense CRF, absent-class
repair, the refinement of one image's probabilities into its pseudo mask, and test-time inference."""
