"""Other KServe v2 servers in `stablemlp bench --peers`: environments pins each in its own
environment and writes its files; peer_kserve and peer_mlserver are the glue those environments
run (they import kserve and mlserver, which ours never installs)."""
