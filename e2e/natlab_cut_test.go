package e2e

import (
	"errors"
	"fmt"
	"os/exec"
	"testing"
	"time"
)

// Scenarios 9 and 10 of TestNATLab: a path that breaks under traffic, silently (loss between the
// NATs) and loudly (a firewall that makes every send fail), must fall back to the relay within
// failoverGoal on both sides and come back once repaired, without a failed request.

// failoverGoal is how long after its path is cut a side may take to be on the relay (issue 14).
const failoverGoal = 1500 * time.Millisecond

// cutCase is one way of breaking the path between two nodes while a client requests a service
// across it: the path falls back to the relay within failoverGoal on both sides, comes back once
// the cause is gone, and no request fails.
type cutCase struct {
	a, b   *natHost // the pair; a runs the client, requesting web-<b>
	kind   string   // a's and b's path to each other before the cut and after the repair
	cut    func(t *testing.T) (undo func())
	effect string // what the cut does, for messages
}

func (l *natLab) cutAndRepair(t *testing.T, tc cutCase) {
	a, b := tc.a, tc.b
	for _, d := range [][2]*natHost{{a, b}, {b, a}} {
		l.waitPath(t, d[0], d[1], 45*time.Second, tc.kind)
	}
	// The relay to fall back to: relay1 (killed and restarted by scenarios 6 to 8) has both nodes
	// registered again.
	l.waitRegistered(t, l.relays[0], 0, 30*time.Second, a, b)
	lp := StartPacedLoop(50*time.Millisecond, 200, func() Result { return fetch(a, b, 5*time.Second) })
	defer lp.Stop()
	lp.WaitSuccess(t, a.role+" → web-"+b.role+" requests succeed", time.Now(), 10*time.Second)
	// A second of steady requests before the cut.
	Eventually(t, 5*time.Second, 50*time.Millisecond, "a second of requests", func() error {
		if rs := lp.Results(); len(rs) < 20 {
			return fmt.Errorf("%d requests so far", len(rs))
		}
		return nil
	})
	cutAt := time.Now()
	undo := tc.cut(t)
	defer undo()
	var took [2]time.Duration
	for i, d := range [][2]*natHost{{a, b}, {b, a}} {
		Eventually(t, 30*time.Second, 50*time.Millisecond, fmt.Sprintf("%s's path to %s is relay", d[0].role, d[1].role), func() error {
			at, ok := l.watch.FirstSince(d[0].name, d[1].name, "relay", cutAt)
			if !ok {
				return fmt.Errorf("history since the cut: %s", l.watch.History(d[0].name, d[1].name, cutAt))
			}
			took[i] = at.Sub(cutAt)
			return nil
		})
	}
	t.Logf("%s: %s → %s on the relay %v after the cut, %s → %s %v (status polled every 100ms)", tc.effect,
		a.role, b.role, took[0].Round(time.Millisecond), b.role, a.role, took[1].Round(time.Millisecond))
	for i, d := range [][2]*natHost{{a, b}, {b, a}} {
		if took[i] > failoverGoal {
			t.Errorf("%s: %s's path to %s went %s → relay %v after the cut, want within %v (history %s)", tc.effect,
				d[0].role, d[1].role, tc.kind, took[i].Round(time.Millisecond), failoverGoal, l.watch.History(d[0].name, d[1].name, cutAt))
		}
	}
	// Two seconds of requests on the relay, then the repair.
	onRelay := cutAt.Add(max(took[0], took[1]))
	Eventually(t, 10*time.Second, 100*time.Millisecond, "2 s of requests on the relay", func() error {
		if rs := lp.Results(); len(rs) == 0 || rs[len(rs)-1].Start.Sub(onRelay) < 2*time.Second {
			return errors.New("still running")
		}
		return nil
	})
	undo()
	repairAt := time.Now()
	for _, d := range [][2]*natHost{{a, b}, {b, a}} {
		l.waitPath(t, d[0], d[1], 30*time.Second, tc.kind)
	}
	t.Logf("%s: back on %s %v after the repair (history %s → %s: %s)", tc.effect, tc.kind,
		time.Since(repairAt).Round(time.Millisecond), a.role, b.role, l.watch.History(a.name, b.name, cutAt))
	Eventually(t, 10*time.Second, 100*time.Millisecond, "2 s of requests after the repair", func() error {
		if rs := lp.Results(); len(rs) == 0 || rs[len(rs)-1].Start.Sub(repairAt) < 2*time.Second {
			return errors.New("still running")
		}
		return nil
	})
	end := time.Now()
	rs := lp.Stop()
	n, failed, gap := Summarize(rs, cutAt.Add(-time.Second), end)
	t.Logf("%s: %d %s → web-%s requests (every 50ms, 5 s timeout) from 1 s before the cut through the repair, %d failed, longest gap between successes %v",
		tc.effect, n, a.role, b.role, len(failed), gap.Round(time.Millisecond))
	for _, f := range failed {
		t.Errorf("%s: request %s after the cut failed", tc.effect, f)
	}
}

// testDirectCut: every UDP datagram between natA and natB is dropped in both routers' FORWARD
// chains (silent loss of the direct path a1 ↔ b1; the relay stays reachable).
func (l *natLab) testDirectCut(t *testing.T) {
	a1, b1 := l.h("a1"), l.h("b1")
	l.cutAndRepair(t, cutCase{a: b1, b: a1, kind: "direct", effect: "UDP between the NATs dropped",
		cut: func(t *testing.T) func() {
			var rules [][]string
			for _, s := range [][2]*Site{{a1.site, b1.site}, {b1.site, a1.site}} {
				other := s[1].Public.String()
				for _, dir := range []string{"-s", "-d"} {
					rule := []string{"FORWARD", "-p", "udp", dir, other, "-j", "DROP"}
					s[0].Router.MustExec(t, append([]string{"iptables", "-I"}, rule...)...)
					rules = append(rules, append([]string{s[0].Router.NS}, rule...))
				}
			}
			return l.undoRules(t, rules)
		}})
}

// testLANRefused: a1's firewall rejects its datagrams to a2's WireGuard port (an OUTPUT REJECT:
// each send fails with EPERM) while a1 requests web-a2.
func (l *natLab) testLANRefused(t *testing.T) {
	a1, a2 := l.h("a1"), l.h("a2")
	l.cutAndRepair(t, cutCase{a: a1, b: a2, kind: "lan", effect: "a1's sends to a2 refused (EPERM)",
		cut: func(t *testing.T) func() {
			rule := []string{"OUTPUT", "-p", "udp", "-d", a2.addr.String(), "--dport", wgPort, "-j", "REJECT"}
			a1.node.MustExec(t, append([]string{"iptables", "-I"}, rule...)...)
			return l.undoRules(t, [][]string{append([]string{a1.node.NS}, rule...)})
		}})
}

// undoRules returns a function, safe to call more than once, that deletes iptables rules given as
// namespace then rule.
func (l *natLab) undoRules(t *testing.T, rules [][]string) func() {
	done := false
	return func() {
		if done {
			return
		}
		done = true
		for _, r := range rules {
			args := append([]string{"netns", "exec", r[0], "iptables", "-D"}, r[1:]...)
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				t.Errorf("delete rule %v: %v: %s", r, err, out)
			}
		}
	}
}

// testDirectRefused: a1's firewall rejects its datagrams to natB's public address (every send of
// the direct path a1 ↔ b1 fails with EPERM; the relay stays reachable) while b1 requests web-a1.
func (l *natLab) testDirectRefused(t *testing.T) {
	a1, b1 := l.h("a1"), l.h("b1")
	l.cutAndRepair(t, cutCase{a: b1, b: a1, kind: "direct", effect: "a1's sends to natB refused (EPERM)",
		cut: func(t *testing.T) func() {
			rule := []string{"OUTPUT", "-p", "udp", "-d", b1.site.Public.String(), "-j", "REJECT"}
			a1.node.MustExec(t, append([]string{"iptables", "-I"}, rule...)...)
			return l.undoRules(t, [][]string{append([]string{a1.node.NS}, rule...)})
		}})
}
