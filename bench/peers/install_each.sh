# Sourced by install.sh and install_offline.sh after they define PACKAGES (peer -> pip requirements), PEERS_DIR
# and install_peer: runs install_peer for each named peer (all three when none is named), refusing unknown names.
install_each() {
  if [ "$#" -eq 0 ]; then
    set -- llmcompressor autoround hqq
  fi
  mkdir -p "$PEERS_DIR"
  for name in "$@"; do
    if [ -z "${PACKAGES[$name]+set}" ]; then
      echo "unknown peer '$name'; choose from: ${!PACKAGES[*]}" >&2
      exit 2
    fi
    install_peer "$name"
  done
}
