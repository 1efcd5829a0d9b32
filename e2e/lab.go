package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// CommandTimeout bounds every command a Node runs to completion with Exec.
const CommandTimeout = 30 * time.Second

// Lab is one test's network of namespaces. Create it with NewLab; everything it creates is removed
// by the cleanup NewLab registers. Methods that can fail take the calling test's testing.TB so
// that subtests fail themselves, not their parent.
type Lab struct {
	// ID is the random part of every name the Lab creates ("ew" + ID + "-" + role).
	ID string
	// Dir is a directory for process logs and files the test writes; removed with the test.
	Dir string

	mu    sync.Mutex // guards all following fields
	nodes []*Node
	procs []*Proc
	// rootLinks are the root namespace's ends of AttachRoot's veth pairs: teardown deletes them
	// itself, because the kernel destroys the interfaces of a deleted namespace asynchronously and
	// the root end would outlive the test for a moment.
	rootLinks []string
}

// NewLab creates an empty lab for t and registers its teardown with t.Cleanup.
func NewLab(t testing.TB) *Lab {
	t.Helper()
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatalf("lab id: %v", err)
	}
	l := &Lab{ID: hex.EncodeToString(b[:]), Dir: t.TempDir()}
	t.Cleanup(func() { l.close(t) })
	return l
}

// Name returns the namespace name of role in this lab.
func (l *Lab) Name(role string) string { return "ew" + l.ID + "-" + role }

// Node is a network namespace: a host, a router or a LAN's switch.
type Node struct {
	lab  *Lab
	Role string
	// NS is the network namespace's name (as `ip netns` knows it).
	NS string

	mu     sync.Mutex // guards nextIf
	nextIf int
}

// Node creates a namespace for a host called role, with its loopback up.
func (l *Lab) Node(t testing.TB, role string) *Node {
	t.Helper()
	n := &Node{lab: l, Role: role, NS: l.Name(role)}
	if out, err := run("ip", "netns", "add", n.NS); err != nil {
		t.Fatalf("create namespace %s: %v\n%s", n.NS, err, out)
	}
	l.mu.Lock()
	l.nodes = append(l.nodes, n)
	l.mu.Unlock()
	n.MustExec(t, "ip", "link", "set", "lo", "up")
	return n
}

// Router creates a node that forwards IPv4 packets between its interfaces.
func (l *Lab) Router(t testing.TB, role string) *Node {
	t.Helper()
	n := l.Node(t, role)
	n.MustExec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	return n
}

// newIf returns the next unused interface name in n ("eth0", "eth1", ...).
func (n *Node) newIf() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	name := fmt.Sprintf("eth%d", n.nextIf)
	n.nextIf++
	return name
}

// LAN is an Ethernet segment: a bridge inside a namespace of its own. Hosts join it with Attach.
type LAN struct {
	// Switch is the namespace holding the bridge "br0".
	Switch *Node
	// Prefix is the segment's subnet; Attach checks addresses against it.
	Prefix netip.Prefix

	mu    sync.Mutex // guards ports
	ports int
}

// LAN creates a segment called role with subnet prefix.
func (l *Lab) LAN(t testing.TB, role string, prefix netip.Prefix) *LAN {
	t.Helper()
	sw := l.Node(t, role)
	sw.MustExec(t, "ip", "link", "add", "br0", "type", "bridge")
	sw.MustExec(t, "ip", "link", "set", "br0", "up")
	return &LAN{Switch: sw, Prefix: prefix.Masked()}
}

// Attach connects n to the segment with a veth pair and gives n's end addr (in the LAN's prefix).
// It returns the name of n's new interface.
func (lan *LAN) Attach(t testing.TB, n *Node, addr netip.Addr) string {
	t.Helper()
	if !lan.Prefix.Contains(addr) {
		t.Fatalf("attach %s to %s: address %s is outside the LAN's %s", n.Role, lan.Switch.Role, addr, lan.Prefix)
	}
	lan.mu.Lock()
	port := fmt.Sprintf("p%d", lan.ports)
	lan.ports++
	lan.mu.Unlock()
	ifName := n.newIf()
	// Created inside the switch namespace with the peer moved straight into n: no interface ever
	// appears in the root namespace.
	lan.Switch.MustExec(t, "ip", "link", "add", port, "type", "veth", "peer", "name", ifName, "netns", n.NS)
	lan.Switch.MustExec(t, "ip", "link", "set", port, "master", "br0", "up")
	n.MustExec(t, "ip", "addr", "add", netip.PrefixFrom(addr, lan.Prefix.Bits()).String(), "dev", ifName)
	n.MustExec(t, "ip", "link", "set", ifName, "up")
	return ifName
}

// AttachRoot connects the root network namespace to the segment with a veth pair and gives the root
// end addr, so that a server the test runs in the root namespace (Lab.StartRoot) is reachable from
// the segment's hosts. The pair goes away with the switch's namespace at teardown.
func (lan *LAN) AttachRoot(t testing.TB, addr netip.Addr) string {
	t.Helper()
	if !lan.Prefix.Contains(addr) {
		t.Fatalf("attach root to %s: address %s is outside the LAN's %s", lan.Switch.Role, addr, lan.Prefix)
	}
	lan.mu.Lock()
	port := fmt.Sprintf("p%d", lan.ports)
	lan.ports++
	lan.mu.Unlock()
	ifName := "ew" + lan.Switch.lab.ID + "r"
	lan.Switch.MustExec(t, "ip", "link", "add", port, "type", "veth", "peer", "name", ifName, "netns", strconv.Itoa(os.Getpid()))
	lan.Switch.MustExec(t, "ip", "link", "set", port, "master", "br0", "up")
	lab := lan.Switch.lab
	lab.mu.Lock()
	lab.rootLinks = append(lab.rootLinks, ifName)
	lab.mu.Unlock()
	for _, args := range [][]string{
		{"ip", "addr", "add", netip.PrefixFrom(addr, lan.Prefix.Bits()).String(), "dev", ifName},
		{"ip", "link", "set", ifName, "up"},
	} {
		if out, err := run(args...); err != nil {
			t.Fatalf("attach root to %s: %s: %v\n%s", lan.Switch.Role, strings.Join(args, " "), err, out)
		}
	}
	return ifName
}

// Link connects a and b with a point-to-point veth pair addressed aAddr and bAddr (same subnet,
// e.g. 10.77.100.1/30 and 10.77.100.2/30). It returns the names of the interfaces in a and b.
func (l *Lab) Link(t testing.TB, a *Node, aAddr netip.Prefix, b *Node, bAddr netip.Prefix) (aIf, bIf string) {
	t.Helper()
	if aAddr.Masked() != bAddr.Masked() {
		t.Fatalf("link %s-%s: %s and %s are not in one subnet", a.Role, b.Role, aAddr, bAddr)
	}
	aIf, bIf = a.newIf(), b.newIf()
	a.MustExec(t, "ip", "link", "add", aIf, "type", "veth", "peer", "name", bIf, "netns", b.NS)
	a.MustExec(t, "ip", "addr", "add", aAddr.String(), "dev", aIf)
	a.MustExec(t, "ip", "link", "set", aIf, "up")
	b.MustExec(t, "ip", "addr", "add", bAddr.String(), "dev", bIf)
	b.MustExec(t, "ip", "link", "set", bIf, "up")
	return aIf, bIf
}

// AddRoute routes dst via gateway in n.
func (n *Node) AddRoute(t testing.TB, dst netip.Prefix, via netip.Addr) {
	t.Helper()
	n.MustExec(t, "ip", "route", "add", dst.String(), "via", via.String())
}

// SetDefaultRoute makes via n's default gateway.
func (n *Node) SetDefaultRoute(t testing.TB, via netip.Addr) {
	t.Helper()
	n.MustExec(t, "ip", "route", "replace", "default", "via", via.String())
}

// Masquerade makes n a NAT router: connections leaving through outIf get its address. With
// randomFully the source port is randomized for every mapping (a "hard", endpoint-dependent NAT);
// without, Linux keeps the port when it can (an "easy" NAT).
func (n *Node) Masquerade(t testing.TB, outIf string, randomFully bool) {
	t.Helper()
	args := []string{"iptables", "-t", "nat", "-A", "POSTROUTING", "-o", outIf, "-j", "MASQUERADE"}
	if randomFully {
		args = append(args, "--random-fully")
	}
	n.MustExec(t, args...)
}

// SetResolvConf writes /etc/netns/<ns>/resolv.conf, which `ip netns exec` mounts over
// /etc/resolv.conf for every process run in n afterwards.
func (n *Node) SetResolvConf(t testing.TB, nameservers ...netip.Addr) {
	t.Helper()
	var b strings.Builder
	for _, ns := range nameservers {
		fmt.Fprintf(&b, "nameserver %s\n", ns)
	}
	b.WriteString("options timeout:2 attempts:2\n")
	dir := filepath.Join("/etc/netns", n.NS)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("resolv.conf for %s: %v", n.NS, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte(b.String()), 0o644); err != nil {
		t.Fatalf("resolv.conf for %s: %v", n.NS, err)
	}
}

// Exec runs a command in n to completion (within CommandTimeout) and returns its combined output.
func (n *Node) Exec(args ...string) (string, error) {
	return n.ExecTimeout(CommandTimeout, args...)
}

// ExecTimeout is Exec with another time limit.
func (n *Node) ExecTimeout(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.NS}, args...)...).CombinedOutput()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("timed out after %v: %w", timeout, err)
		}
		return string(out), fmt.Errorf("in %s: %s: %w", n.Role, strings.Join(args, " "), err)
	}
	return string(out), nil
}

// MustExec is Exec that fails t on error.
func (n *Node) MustExec(t testing.TB, args ...string) string {
	t.Helper()
	out, err := n.Exec(args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// close stops every process, then deletes every namespace and /etc/netns directory of the lab.
func (l *Lab) close(t testing.TB) {
	l.mu.Lock()
	procs, nodes, rootLinks := l.procs, l.nodes, l.rootLinks
	l.procs, l.nodes, l.rootLinks = nil, nil, nil
	l.mu.Unlock()

	if t.Failed() {
		for _, p := range procs {
			t.Logf("--- last lines of %s (%s) ---\n%s", p.Name, p.LogPath, p.Tail(40))
		}
	}
	var errs []error
	for i := len(procs) - 1; i >= 0; i-- {
		// An exit status is the test's business; teardown only minds a process that will not die.
		if err := procs[i].Stop(3 * time.Second); err != nil && !procs[i].Exited() {
			errs = append(errs, err)
		}
	}
	for _, link := range rootLinks {
		// Deleting one end of a veth pair deletes both, at once.
		if out, err := run("ip", "link", "del", link); err != nil {
			errs = append(errs, fmt.Errorf("delete root link %s: %w: %s", link, err, out))
		}
	}
	for i := len(nodes) - 1; i >= 0; i-- {
		if out, err := run("ip", "netns", "del", nodes[i].NS); err != nil {
			errs = append(errs, fmt.Errorf("delete namespace %s: %w: %s", nodes[i].NS, err, out))
		}
		if err := os.RemoveAll(filepath.Join("/etc/netns", nodes[i].NS)); err != nil {
			errs = append(errs, fmt.Errorf("remove /etc/netns/%s: %w", nodes[i].NS, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		t.Errorf("lab %s teardown: %v", l.ID, err)
	}
}

// run runs a command in the root namespace (`ip netns add/del`, and AttachRoot's link).
func run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	return string(out), err
}

// Eventually polls cond every interval until it returns nil or timeout passes; it then fails t
// with the last error. It returns how long it took.
func Eventually(t testing.TB, timeout, interval time.Duration, what string, cond func() error) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(timeout)
	for {
		err := cond()
		if err == nil {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after %v: %v", what, timeout, err)
		}
		time.Sleep(interval)
	}
}

// Capture starts tcpdump on iface in n, writing a pcap into the lab's directory (kept only while
// the test runs: copy it out from a failing test's log if needed). It returns once tcpdump listens.
func (n *Node) Capture(t testing.TB, iface string, filter ...string) *Proc {
	t.Helper()
	pcap := filepath.Join(n.lab.Dir, fmt.Sprintf("%s-%s.pcap", n.Role, iface))
	args := append([]string{"tcpdump", "-n", "-U", "-i", iface, "-w", pcap}, filter...)
	p := n.Start(t, "tcpdump-"+iface, args...)
	p.WaitLog(t, "listening on", 10*time.Second)
	return p
}
