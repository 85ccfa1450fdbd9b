"""anomaly-lab: visual anomaly detection research framework."""
