"""The fleet: one certbot host publishes each host's lineages to etcd, sealed to that
host; a subscriber on each host installs them and acknowledges (store.py: etcd client;
seal.py: keys and sealing; publish.py: the certbot host's side; subscribe.py: a fleet
host's side)."""
