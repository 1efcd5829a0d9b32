// Package e2e owns edgewire's end-to-end tests: it builds small networks out of Linux network
// namespaces (hosts, LAN bridges, point-to-point links, routers, NAT routers), runs the real binaries
// (meshctl, e2e/testserver) and real clients (curl, dig, wg, iperf3) inside them, and checks what a
// user would see.
//
// The harness (Lab, Node, LAN, Proc, Tools) lives in the non-test files so that scenario tests of
// every topology share it; the scenarios are the _test files. Everything a Lab creates is named
// "ew<id>-<role>" with a random id per Lab, lives only inside namespaces the Lab created (nothing is
// added to the host's root namespace: a LAN bridge lives in its own namespace), and is removed by the
// test's cleanup, which also prints the tail of every process log when the test failed.
//
// The tests need root and the tools that `make deps` (scripts/install-deps.sh) installs; a missing
// tool fails the run with a message naming the package to install.
package e2e
