"""`pgscout demo`: a throwaway cluster, pgscout and a workload with N+1 loops."""
