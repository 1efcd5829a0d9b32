package flows

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	clientA = netip.MustParseAddr("10.0.0.1")
	clientB = netip.MustParseAddr("10.0.0.2")
	clientC = netip.MustParseAddr("fd00::3")
)

func TestShare(t *testing.T) {
	tests := []struct {
		name                     string
		limit, div, lo, hi, want int
	}{
		{"the load goals' limit", 20000, 5, 64, 8192, 4000},
		{"a tiny limit gets the floor", 100, 5, 64, 8192, 64},
		{"a huge limit gets the ceiling", 1 << 20, 5, 64, 8192, 8192},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Share(tc.limit, tc.div, tc.lo, tc.hi); got != tc.want {
				t.Fatalf("Share(%d, %d, %d, %d) = %d, want %d", tc.limit, tc.div, tc.lo, tc.hi, got, tc.want)
			}
		})
	}
}

func TestFDLimit(t *testing.T) {
	if got := FDLimit(); got < 1 || got > 1<<20 {
		t.Fatalf("FDLimit() = %d, want within [1, 1<<20]", got)
	}
}

// step is one operation on a Table and what it must answer.
type step struct {
	op      string // "acquire", "release"
	client  netip.Addr
	wantErr error
}

func TestTableCaps(t *testing.T) {
	mapped := netip.AddrFrom16(clientA.As16()) // ::ffff:10.0.0.1, the same client as clientA
	tests := []struct {
		name             string
		perClient, total int
		steps            []step
		wantLen          int
		wantClients      int
	}{
		{
			name: "a client stops at its cap, others go on", perClient: 2, total: 10,
			steps: []step{
				{"acquire", clientA, nil}, {"acquire", clientA, nil}, {"acquire", clientA, ErrClientCap},
				{"acquire", clientB, nil},
			},
			wantLen: 3, wantClients: 2,
		},
		{
			name: "the total cap holds across clients", perClient: 2, total: 3,
			steps: []step{
				{"acquire", clientA, nil}, {"acquire", clientA, nil}, {"acquire", clientB, nil},
				{"acquire", clientC, ErrTotalCap}, {"acquire", clientA, ErrClientCap},
			},
			wantLen: 3, wantClients: 2,
		},
		{
			name: "a release frees a slot", perClient: 1, total: 1,
			steps: []step{
				{"acquire", clientA, nil}, {"acquire", clientB, ErrTotalCap}, {"release", clientA, nil},
				{"acquire", clientB, nil},
			},
			wantLen: 1, wantClients: 1,
		},
		{
			name: "an IPv4-mapped address is the IPv4 client", perClient: 1, total: 5,
			steps:   []step{{"acquire", clientA, nil}, {"acquire", mapped, ErrClientCap}},
			wantLen: 1, wantClients: 1,
		},
		{
			name: "a release of a client without slots does nothing", perClient: 1, total: 5,
			steps:   []step{{"release", clientB, nil}, {"acquire", clientA, nil}},
			wantLen: 1, wantClients: 1,
		},
		{
			name: "a per-client cap above the total is the total", perClient: 9, total: 2,
			steps:   []step{{"acquire", clientA, nil}, {"acquire", clientA, nil}, {"acquire", clientA, ErrClientCap}},
			wantLen: 2, wantClients: 1,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tb := NewTable[Counted](tc.perClient, tc.total)
			for i, s := range tc.steps {
				switch s.op {
				case "acquire":
					if err := tb.Acquire(s.client); !errors.Is(err, s.wantErr) || (err == nil) != (s.wantErr == nil) {
						t.Fatalf("step %d: Acquire(%v) = %v, want %v", i, s.client, err, s.wantErr)
					}
				case "release":
					tb.Release(s.client)
				}
			}
			if tb.Len() != tc.wantLen || tb.Clients() != tc.wantClients {
				t.Fatalf("Len %d, Clients %d; want %d, %d", tb.Len(), tb.Clients(), tc.wantLen, tc.wantClients)
			}
		})
	}
}

// testFlow is a Flow with a settable last activity.
type testFlow struct {
	name string
	last int64
}

func (f *testFlow) LastActive() int64 { return f.last }

func TestTableEvict(t *testing.T) {
	const minIdle = 10 * time.Second
	now := time.Unix(1000, 0).UnixNano()
	ago := func(d time.Duration) int64 { return now - int64(d) }
	tests := []struct {
		name      string
		flows     []*testFlow // attached flows of clientA, in order
		wantEvict string      // "" for none
	}{
		{"the least recently active idle flow goes",
			[]*testFlow{{"a", ago(20 * time.Second)}, {"b", ago(30 * time.Second)}, {"c", ago(time.Second)}}, "b"},
		{"a flow idle exactly minIdle goes", []*testFlow{{"a", ago(minIdle)}}, "a"},
		{"no flow idle long enough: none goes",
			[]*testFlow{{"a", ago(9 * time.Second)}, {"b", ago(time.Second)}}, ""},
		{"flows still being set up are no candidates", nil, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tb := NewTable[*testFlow](len(tc.flows)+1, 100)
			for _, f := range tc.flows {
				if err := tb.Acquire(clientA); err != nil {
					t.Fatal(err)
				}
				tb.Attach(clientA, f)
			}
			if err := tb.Acquire(clientA); err != nil { // one more, never attached
				t.Fatal(err)
			}
			held := tb.Len()
			victim, ok := tb.Evict(clientA, now, minIdle)
			if tc.wantEvict == "" {
				if ok {
					t.Fatalf("evicted %q, want none", victim.name)
				}
				if tb.Len() != held {
					t.Fatalf("Len %d after no eviction, want %d", tb.Len(), held)
				}
				return
			}
			if !ok || victim.name != tc.wantEvict {
				t.Fatalf("Evict = %v, %v; want %q", victim, ok, tc.wantEvict)
			}
			if tb.Len() != held-1 {
				t.Fatalf("Len %d after an eviction, want %d", tb.Len(), held-1)
			}
			if tb.Detach(clientA, victim) {
				t.Fatal("Detach of an evicted flow gave back a second slot")
			}
			if tb.Len() != held-1 {
				t.Fatalf("Len %d after detaching the evicted flow, want %d", tb.Len(), held-1)
			}
		})
	}
}

// TestTableEvictWaits checks that after a fruitless scan Evict answers "none" without scanning
// until the oldest flow can be idle enough, and evicts it from then on.
func TestTableEvictWaits(t *testing.T) {
	const minIdle = 10 * time.Second
	start := time.Unix(1000, 0).UnixNano()
	f := &testFlow{"a", start}
	tb := NewTable[*testFlow](1, 10)
	if err := tb.Acquire(clientA); err != nil {
		t.Fatal(err)
	}
	tb.Attach(clientA, f)
	sec := int64(time.Second)
	steps := []struct {
		name  string
		at    int64 // seconds after start
		last  int64 // f's last activity, seconds after start, before the step
		evict bool
	}{
		{"just active: none", 1, 0, false},
		{"still too soon", 5, 0, false},
		{"active again, so at the first candidate time still none", 10, 6, false},
		{"idle enough since its last activity", 16, 6, true},
	}
	for _, s := range steps {
		f.last = start + s.last*sec
		_, ok := tb.Evict(clientA, start+s.at*sec, minIdle)
		if ok != s.evict {
			t.Fatalf("%s: Evict = %v, want %v", s.name, ok, s.evict)
		}
	}
	if tb.Len() != 0 || tb.Clients() != 0 {
		t.Fatalf("Len %d, Clients %d after evicting the only flow; want 0, 0", tb.Len(), tb.Clients())
	}
}

func TestTableDetach(t *testing.T) {
	tb := NewTable[*testFlow](2, 2)
	a, b := &testFlow{name: "a"}, &testFlow{name: "b"}
	for _, f := range []*testFlow{a, b} {
		if err := tb.Acquire(clientA); err != nil {
			t.Fatal(err)
		}
		tb.Attach(clientA, f)
	}
	tests := []struct {
		name    string
		f       *testFlow
		want    bool
		wantLen int
	}{
		{"an attached flow gives its slot back", a, true, 1},
		{"twice gives nothing more", a, false, 1},
		{"the other one too", b, true, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tb.Detach(clientA, tc.f); got != tc.want || tb.Len() != tc.wantLen {
				t.Fatalf("Detach = %v, Len %d; want %v, %d", got, tb.Len(), tc.want, tc.wantLen)
			}
		})
	}
}
