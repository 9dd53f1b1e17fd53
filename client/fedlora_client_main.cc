// fedlora-client: a site's node. Joins the coordinator over TLS (mutual TLS with --cert/--key),
// trains when selected, uploads its update, and catches up on whatever it missed. Exits 0 when the
// run is done; SIGTERM stops it cleanly. Its options are in client/client_options.h.
#include "client/client_options.h"

int main(int argc, char** argv) { return fedlora::client::ClientMain(argc, argv); }
