package e2e

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// The Kubernetes topology: a real kube-apiserver (and its etcd) in the root namespace, reachable on
// the lab's LAN at kubeAPIAddr; two nodes on that LAN, each with an agent reading the API with the
// edgewire-agent ServiceAccount of deploy/ (so the shipped RBAC is what is tested) and a pod
// namespace behind it that only the overlay reaches; mesh-relay on the LAN publishing itself into
// the relay Secret as the in-cluster Deployment does.
//
//	root    100.127.250.254  kube-apiserver, etcd (127.0.0.1)
//	relay   100.127.250.100  mesh-relay --kube-secret edgewire/edgewire-relay
//	node1   100.127.250.1 ── pod1 10.244.1.10  testserver http :8080 (name kpod1)
//	node2   100.127.250.2 ── pod2 10.244.2.10  testserver http :8080 (name kpod2)
const (
	kubeLAN      = "100.127.250.0/24"
	kubeAPIAddr  = "100.127.250.254"
	kubeRelayIP  = "100.127.250.100"
	kubeSvcRange = "9.251.0.0/16"
	kubeNS       = "e2e-k8s"
	kubeHealth   = "127.0.0.1:9269"
)

type kubeNode struct {
	name  string
	node  *Node
	lanIP string
	pod   *Node
	podIP string
	agent *Agent
}

type kubeLab struct {
	lab        *Lab
	lan        *LAN
	api        *KubeAPI
	meshctl    string
	nodes      []*kubeNode
	tokenFile  string
	agentToken string
	relay      *Relay
}

func (k *kubeLab) n(i int) *kubeNode { return k.nodes[i-1] }

func TestKubernetes(t *testing.T) {
	meshctl := needMeshctl(t)
	start := time.Now()
	lab := NewLab(t)
	k := &kubeLab{lab: lab, meshctl: meshctl}
	lan := lab.LAN(t, "lan", netip.MustParsePrefix(kubeLAN))
	k.lan = lan
	lan.AttachRoot(t, netip.MustParseAddr(kubeAPIAddr))
	k.api = StartKubeAPI(t, lab, netip.MustParseAddr(kubeAPIAddr), kubeSvcRange)

	for i := 1; i <= 2; i++ {
		kn := &kubeNode{name: fmt.Sprintf("node%d", i), lanIP: fmt.Sprintf("100.127.250.%d", i),
			podIP: fmt.Sprintf("10.244.%d.10", i)}
		kn.node = lab.Node(t, kn.name)
		lan.Attach(t, kn.node, netip.MustParseAddr(kn.lanIP))
		kn.pod, _ = AddPod(t, kn.node, fmt.Sprintf("pod%d", i), netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i)))
		kn.node.SetResolvConf(t, netip.MustParseAddr(dnsIP))
		p := kn.pod.Start(t, "http", bins.Testserver, "http", "--listen", ":8080", "--name", "k"+kn.pod.Role)
		p.WaitLog(t, "listening on", 10*time.Second)
		k.nodes = append(k.nodes, kn)
	}
	t.Logf("topology and API server up in %v", time.Since(start).Round(time.Millisecond))

	t.Run("deploy manifests accepted", k.testDeploy)
	if t.Failed() {
		return
	}
	t.Run("RBAC least privilege", k.testRBAC)
	t.Run("relay publishes itself", k.testRelaySecret)
	if t.Failed() {
		return
	}
	t.Run("agents start", k.testAgentsStart)
	if t.Failed() {
		return
	}
	t.Run("node annotations published", k.testAnnotations)
	t.Run("service across nodes", k.testService)
	t.Run("scale, terminate, delete", k.testLifecycle)
	t.Run("headless, ExternalName, no endpoints", k.testKinds)
	t.Run("change answered by DNS on every agent", k.testPropagation)
	t.Run("offline from the cache", k.testOffline)
}

// testDeploy applies every file of deploy/kustomization.yaml to the API server as the admin, plus
// the join token Secret that its secretGenerator makes from a file the operator generates.
func (k *kubeLab) testDeploy(t *testing.T) {
	var kust struct {
		Namespace string   `yaml:"namespace"`
		Resources []string `yaml:"resources"`
	}
	data, err := os.ReadFile("../deploy/kustomization.yaml")
	if err != nil {
		t.Fatalf("read deploy/kustomization.yaml: %v", err)
	}
	if err := yaml.Unmarshal(data, &kust); err != nil {
		t.Fatalf("deploy/kustomization.yaml: %v", err)
	}
	if kust.Namespace == "" || len(kust.Resources) == 0 {
		t.Fatalf("deploy/kustomization.yaml: want a namespace and resources, got %+v", kust)
	}
	var applied []string
	for _, res := range kust.Resources {
		manifest, err := os.ReadFile(filepath.Join("../deploy", res))
		if err != nil {
			t.Fatalf("deploy/%s: %v", res, err)
		}
		// A dry run first: the server validates and admits everything before anything is stored.
		k.api.Apply(t, string(manifest), kust.Namespace, true)
		for _, o := range k.api.Apply(t, string(manifest), kust.Namespace, false) {
			applied = append(applied, res+": "+o.String())
		}
	}
	t.Logf("applied %d objects:\n  %s", len(applied), strings.Join(applied, "\n  "))
	for _, want := range []string{"DaemonSet edgewire/edgewire-agent", "Deployment edgewire/mesh-relay",
		"ClusterRole edgewire-agent", "Secret edgewire/edgewire-relay"} {
		if !slices.ContainsFunc(applied, func(s string) bool { return strings.HasSuffix(s, ": "+want) }) {
			t.Errorf("deploy/ has no %s", want)
		}
	}

	var tok [32]byte
	if _, err := rand.Read(tok[:]); err != nil {
		t.Fatal(err)
	}
	token := base64.StdEncoding.EncodeToString(tok[:])
	k.tokenFile = filepath.Join(k.lab.Dir, "join-token")
	if err := os.WriteFile(k.tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	k.api.Apply(t, fmt.Sprintf(`apiVersion: v1
kind: Secret
metadata: {name: edgewire-join-token, namespace: edgewire}
type: Opaque
data: {join-token: %s}
`, base64.StdEncoding.EncodeToString([]byte(token))), "edgewire", false)
	k.api.Apply(t, "apiVersion: v1\nkind: Namespace\nmetadata: {name: "+kubeNS+"}\n", "", false)
	for _, kn := range k.nodes {
		// No kubelet registers the nodes: the test does, as the admin.
		k.api.Apply(t, fmt.Sprintf(`apiVersion: v1
kind: Node
metadata: {name: %s, labels: {kubernetes.io/hostname: %s}}
`, kn.name, kn.name), "", false)
	}
}

// testRBAC checks what the shipped roles allow the agents' and the relay's ServiceAccounts.
func (k *kubeLab) testRBAC(t *testing.T) {
	k.agentToken = k.api.ServiceAccountToken(t, "edgewire", "edgewire-agent")
	relayToken := k.api.ServiceAccountToken(t, "edgewire", "mesh-relay")
	cases := []struct {
		name                     string
		token                    string
		verb, group, res, ns, nm string
		want                     bool
	}{
		{"agent watches services", k.agentToken, "watch", "", "services", "", "", true},
		{"agent lists endpointslices", k.agentToken, "list", "discovery.k8s.io", "endpointslices", "", "", true},
		{"agent lists nodes", k.agentToken, "list", "", "nodes", "", "", true},
		{"agent patches nodes", k.agentToken, "patch", "", "nodes", "", "node1", true},
		{"agent reads the relay secret", k.agentToken, "get", "", "secrets", "edgewire", "edgewire-relay", true},
		{"agent cannot read the join token secret", k.agentToken, "get", "", "secrets", "edgewire", "edgewire-join-token", false},
		{"agent cannot list secrets", k.agentToken, "list", "", "secrets", "", "", false},
		{"agent cannot create services", k.agentToken, "create", "", "services", kubeNS, "", false},
		{"agent cannot delete nodes", k.agentToken, "delete", "", "nodes", "", "node1", false},
		{"agent cannot write endpointslices", k.agentToken, "update", "discovery.k8s.io", "endpointslices", kubeNS, "", false},
		{"agent cannot read pods", k.agentToken, "list", "", "pods", "", "", false},
		{"relay patches the relay secret", relayToken, "patch", "", "secrets", "edgewire", "edgewire-relay", true},
		{"relay cannot read the join token secret", relayToken, "get", "", "secrets", "edgewire", "edgewire-join-token", false},
		{"relay cannot create secrets", relayToken, "create", "", "secrets", "edgewire", "", false},
		{"relay cannot list nodes", relayToken, "list", "", "nodes", "", "", false},
	}
	for _, c := range cases {
		if got := k.api.CanI(t, c.token, c.verb, c.group, c.res, c.ns, c.nm); got != c.want {
			t.Errorf("%s: allowed=%v, want %v (%s %s/%s %s/%s)", c.name, got, c.want, c.verb, c.group, c.res, c.ns, c.nm)
		}
	}
}

// testRelaySecret starts mesh-relay with the mesh-relay ServiceAccount and waits for its addresses in
// the relay Secret, where the agents find them.
func (k *kubeLab) testRelaySecret(t *testing.T) {
	relayNode := k.lab.Node(t, "relay")
	k.relay = NewRelay(relayNode, netip.MustParseAddr(kubeRelayIP), BuildMeshRelay(t, k.lab.Dir), k.tokenFile)
	k.lan.Attach(t, relayNode, netip.MustParseAddr(kubeRelayIP))
	kubeconfig := filepath.Join(k.lab.Dir, "relay.kubeconfig")
	k.api.WriteKubeconfig(t, kubeconfig, k.api.ServiceAccountToken(t, "edgewire", "mesh-relay"))
	k.relay.Extra = []string{"--kube-secret", "edgewire/edgewire-relay", "--kubeconfig", kubeconfig}
	k.relay.Start(t, 20*time.Second)
	secret := KubeObject{APIVersion: "v1", Kind: "Secret", Namespace: "edgewire", Name: "edgewire-relay"}
	took := Eventually(t, 20*time.Second, 100*time.Millisecond, "relay addresses in Secret edgewire/edgewire-relay", func() error {
		obj := k.api.Get(t, secret)
		data, _ := obj["data"].(map[string]any)
		v, ok := data[k.relay.PeerID].(string)
		if !ok {
			return fmt.Errorf("no key %s in data %v", k.relay.PeerID, data)
		}
		addrs, err := base64.StdEncoding.DecodeString(v)
		if err != nil {
			return err
		}
		if !strings.Contains(string(addrs), k.relay.Multiaddr()) {
			return fmt.Errorf("data[%s] = %q, want it to list %s", k.relay.PeerID, addrs, k.relay.Multiaddr())
		}
		return nil
	})
	t.Logf("relay published %s in %v", k.relay.Multiaddr(), took.Round(time.Millisecond))
}

func (k *kubeLab) startAgent(t testing.TB, kn *kubeNode) {
	t.Helper()
	kubeconfig := filepath.Join(k.lab.Dir, kn.name+".kubeconfig")
	if _, err := os.Stat(kubeconfig); err != nil {
		k.api.WriteKubeconfig(t, kubeconfig, k.agentToken)
	}
	resolvConf := filepath.Join(k.lab.Dir, "upstream-resolv.conf")
	if err := os.WriteFile(resolvConf, []byte("nameserver 127.0.0.1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	kn.agent = StartAgent(t, kn.node, AgentOptions{
		Meshctl:    k.meshctl,
		ResolvConf: resolvConf,
		Extra: []string{"--kubeconfig", kubeconfig, "--kube-sync-timeout", "3s",
			"--join-token-file", k.tokenFile, "--health-addr", kubeHealth},
	})
}

func (k *kubeLab) testAgentsStart(t *testing.T) {
	for _, kn := range k.nodes {
		k.startAgent(t, kn)
	}
	for _, kn := range k.nodes {
		took := kn.agent.WaitReady(t, 30*time.Second)
		out, err := kn.node.Exec("curl", "-sS", "-m", "3", "http://"+kubeHealth+"/readyz")
		if err != nil || strings.TrimSpace(out) != "ready" {
			t.Errorf("%s: /readyz: %v %q", kn.name, err, out)
		}
		t.Logf("%s ready in %v", kn.name, took.Round(time.Millisecond))
	}
	// The relay came from the Secret, not from a flag.
	for _, kn := range k.nodes {
		var st struct {
			Relays []string `json:"relays"`
		}
		Eventually(t, 20*time.Second, 100*time.Millisecond, kn.name+" registered with the relay from the Secret", func() error {
			kn.agent.CtlJSON(t, &st, "status")
			for _, r := range st.Relays {
				if strings.Contains(r, k.relay.PeerID) || strings.Contains(r, kubeRelayIP) {
					if !strings.HasPrefix(r, "registering") {
						return nil
					}
				}
			}
			return fmt.Errorf("relays %q", st.Relays)
		})
	}
}

// testAnnotations checks that each agent published its key, overlay address and LAN endpoint on its
// Node, and that each sees the other as a WireGuard peer from them.
func (k *kubeLab) testAnnotations(t *testing.T) {
	for _, kn := range k.nodes {
		st := kn.agent.OverlayStatus(t)
		Eventually(t, 10*time.Second, 100*time.Millisecond, kn.name+" annotations", func() error {
			obj := k.api.Get(t, KubeObject{APIVersion: "v1", Kind: "Node", Name: kn.name})
			meta, _ := obj["metadata"].(map[string]any)
			ann, _ := meta["annotations"].(map[string]any)
			if got := ann["edgewire.io/wireguard-public-key"]; got != st.PublicKey {
				return fmt.Errorf("wireguard-public-key %v, want %s", got, st.PublicKey)
			}
			if got := ann["edgewire.io/overlay-address"]; got != st.Overlay {
				return fmt.Errorf("overlay-address %v, want %s", got, st.Overlay)
			}
			if eps, _ := ann["edgewire.io/endpoints"].(string); !strings.Contains(eps, kn.lanIP+":51820") {
				return fmt.Errorf("endpoints %q, want %s:51820 in it", eps, kn.lanIP)
			}
			return nil
		})
	}
	for i, kn := range k.nodes {
		other := k.nodes[1-i]
		Eventually(t, 10*time.Second, 100*time.Millisecond, kn.name+" has "+other.name+" as a peer", func() error {
			for _, p := range kn.agent.OverlayStatus(t).Peers {
				if p.Node == other.name {
					return nil
				}
			}
			return errors.New("not yet")
		})
	}
}

func (k *kubeLab) applySvc(t testing.TB, manifest string) {
	t.Helper()
	k.api.Apply(t, manifest, kubeNS, false)
}

// sliceYAML renders an EndpointSlice of service svc with endpoints "ip@node" (optionally
// "ip@node:terminating").
func sliceYAML(name, svc string, eps ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: %s
  namespace: %s
  labels: {kubernetes.io/service-name: %s}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
`, name, kubeNS, svc)
	for _, e := range eps {
		ipNode, state, _ := strings.Cut(e, ":")
		ip, node, _ := strings.Cut(ipNode, "@")
		cond := "{ready: true, serving: true, terminating: false}"
		if state == "terminating" {
			cond = "{ready: false, serving: true, terminating: true}"
		}
		fmt.Fprintf(&b, "- {addresses: [%s], nodeName: %s, conditions: %s}\n", ip, node, cond)
	}
	return b.String()
}

func svcYAML(name string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: %s, namespace: %s}
spec:
  ports: [{name: http, port: 80, targetPort: http, protocol: TCP}]
`, name, kubeNS)
}

func (k *kubeLab) url(svc string) string {
	return "http://" + svc + "." + kubeNS + ".svc.cluster.local/"
}

// backends fetches url n times from kn and counts the answering backends; failures are errors.
func backends(t testing.TB, kn *kubeNode, url string, n int) map[string]int {
	t.Helper()
	counts := map[string]int{}
	for _, r := range curlMesh(t, kn.node, url, n) {
		if !r.ok() {
			t.Errorf("GET %s from %s: %+v", url, kn.name, r)
			continue
		}
		counts[r.backend]++
	}
	return counts
}

func (k *kubeLab) testService(t *testing.T) {
	k.applySvc(t, svcYAML("web"))
	k.applySvc(t, sliceYAML("web-a", "web", k.n(1).podIP+"@node1"))
	svc := k.api.Get(t, KubeObject{APIVersion: "v1", Kind: "Service", Namespace: kubeNS, Name: "web"})
	spec, _ := svc["spec"].(map[string]any)
	clusterIP, _ := spec["clusterIP"].(string)
	for _, kn := range k.nodes {
		Eventually(t, 10*time.Second, 50*time.Millisecond, kn.name+" knows web", func() error {
			row, ok := kn.agent.Services(t)[kubeNS+"/web"]
			if !ok || row.Total != 1 {
				return fmt.Errorf("services: %+v", row)
			}
			if row.IP != clusterIP {
				return fmt.Errorf("service IP %s, want the API server's ClusterIP %s (inside %s)", row.IP, clusterIP, kubeSvcRange)
			}
			return nil
		})
	}
	// node2 reaches pod1 only through the overlay: its endpoint is on node1.
	counts := backends(t, k.n(2), k.url("web"), 10)
	if counts["kpod1"] != 10 {
		t.Errorf("from node2 (endpoint on node1): backends %v, want kpod1 ×10", counts)
	}
	counts = backends(t, k.n(1), "http://"+clusterIP+"/", 5)
	if counts["kpod1"] != 5 {
		t.Errorf("from node1 by service IP: backends %v, want kpod1 ×5", counts)
	}
}

func (k *kubeLab) testLifecycle(t *testing.T) {
	// Scale up: a second slice with an endpoint on node2.
	k.applySvc(t, sliceYAML("web-b", "web", k.n(2).podIP+"@node2"))
	Eventually(t, 10*time.Second, 50*time.Millisecond, "both endpoints", func() error {
		if row := k.n(1).agent.Services(t)[kubeNS+"/web"]; row.Ready != 2 {
			return fmt.Errorf("node1 sees %d ready endpoints", row.Ready)
		}
		return nil
	})
	counts := backends(t, k.n(1), k.url("web"), 20)
	if counts["kpod1"] == 0 || counts["kpod2"] == 0 || counts["kpod1"]+counts["kpod2"] != 20 {
		t.Errorf("after scaling to two slices: backends %v, want both", counts)
	}
	// pod1's endpoint terminates: no new flows go to it.
	k.applySvc(t, sliceYAML("web-a", "web", k.n(1).podIP+"@node1:terminating"))
	Eventually(t, 10*time.Second, 50*time.Millisecond, "terminating endpoint", func() error {
		if row := k.n(2).agent.Services(t)[kubeNS+"/web"]; row.Ready != 1 {
			return fmt.Errorf("node2 sees %d ready endpoints", row.Ready)
		}
		return nil
	})
	if counts := backends(t, k.n(2), k.url("web"), 10); counts["kpod2"] != 10 {
		t.Errorf("with pod1 terminating: backends %v, want kpod2 ×10", counts)
	}
	k.applySvc(t, sliceYAML("web-a", "web", k.n(1).podIP+"@node1"))

	// Delete a service: DNS stops answering for it on every node.
	k.applySvc(t, svcYAML("gone"))
	k.applySvc(t, sliceYAML("gone-a", "gone", k.n(1).podIP+"@node1"))
	for _, kn := range k.nodes {
		Eventually(t, 10*time.Second, 50*time.Millisecond, kn.name+" resolves gone", func() error {
			return digHas(kn, "gone", "A", "9.251.")
		})
	}
	k.api.Delete(t, KubeObject{APIVersion: "v1", Kind: "Service", Namespace: kubeNS, Name: "gone"})
	for _, kn := range k.nodes {
		Eventually(t, 10*time.Second, 50*time.Millisecond, kn.name+" forgets gone", func() error {
			return digStatus(kn, "gone", "NXDOMAIN")
		})
	}
}

func (k *kubeLab) testKinds(t *testing.T) {
	k.applySvc(t, fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: ext, namespace: %s}
spec: {type: ExternalName, externalName: video.example.org}
---
apiVersion: v1
kind: Service
metadata: {name: hl, namespace: %s}
spec:
  clusterIP: None
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: %s}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
`, kubeNS, kubeNS, kubeNS))
	k.applySvc(t, sliceYAML("hl-a", "hl", k.n(1).podIP+"@node1", k.n(2).podIP+"@node2"))
	kn := k.n(2)
	Eventually(t, 10*time.Second, 50*time.Millisecond, "ExternalName answers a CNAME", func() error {
		return digHas(kn, "ext", "CNAME", "video.example.org.")
	})
	Eventually(t, 10*time.Second, 50*time.Millisecond, "headless answers the endpoints", func() error {
		if err := digHas(kn, "hl", "A", k.n(1).podIP); err != nil {
			return err
		}
		return digHas(kn, "hl", "A", k.n(2).podIP)
	})
	Eventually(t, 10*time.Second, 50*time.Millisecond, "a service without endpoints still resolves", func() error {
		return digHas(kn, "empty", "A", "9.251.")
	})
	// No endpoints: the connection is refused at once, not left to time out.
	start := time.Now()
	out, err := kn.node.Exec("curl", "-sS", "-m", "5", k.url("empty"))
	took := time.Since(start)
	// curl exit status 7: "Failed to connect" (the SYN was answered with a RST).
	if err == nil || !strings.Contains(err.Error(), "exit status 7") {
		t.Errorf("curl to a service without endpoints: %v %q, want connection refused", err, out)
	}
	if took > 2*time.Second {
		t.Errorf("curl to a service without endpoints took %v, want a refusal at once", took)
	}
}

// testPropagation creates a service and measures how long until DNS on every agent answers it.
func (k *kubeLab) testPropagation(t *testing.T) {
	var results []string
	for round := 1; round <= 3; round++ {
		name := "late" + strconv.Itoa(round)
		k.applySvc(t, svcYAML(name))
		start := time.Now()
		var wg sync.WaitGroup
		took := make([]time.Duration, len(k.nodes))
		errs := make([]error, len(k.nodes))
		for i, kn := range k.nodes {
			// Eventually may not run here: it fails the test from another goroutine.
			wg.Go(func() {
				for errs[i] = digHas(kn, name, "A", "9.251."); errs[i] != nil && time.Since(start) < 10*time.Second; errs[i] = digHas(kn, name, "A", "9.251.") {
					time.Sleep(10 * time.Millisecond)
				}
				took[i] = time.Since(start)
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("%s not answered within 10 s: %v", name, err)
		}
		results = append(results, fmt.Sprintf("%s: node1 %v, node2 %v", name, took[0].Round(time.Millisecond), took[1].Round(time.Millisecond)))
	}
	t.Logf("API change (apply returned) to DNS answer on every agent (dig polled every 10 ms): %s", strings.Join(results, "; "))
}

// testOffline stops the API server, restarts node2's agent, and checks that it serves DNS and
// traffic from its cache; then cuts node2 off the restarted server, makes a change, and checks that
// node2 picks it up once it can reach the server again.
func (k *kubeLab) testOffline(t *testing.T) {
	k.api.Stop(t)
	kn := k.n(2)
	if err := kn.agent.Stop(10 * time.Second); err != nil {
		t.Fatalf("stop node2's agent: %v", err)
	}
	start := time.Now()
	k.startAgent(t, kn)
	kn.agent.WaitReady(t, 30*time.Second)
	t.Logf("node2's agent serves from its cache %v after start (API server down)", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(kn.agent.Log(), "cache") {
		t.Errorf("node2's agent log does not mention the cache it serves from")
	}
	if err := digHas(kn, "web", "A", "9.251."); err != nil {
		t.Errorf("offline DNS: %v", err)
	}
	counts := backends(t, kn, k.url("web"), 10)
	if counts["kpod1"] == 0 || counts["kpod2"] == 0 {
		t.Errorf("offline traffic: backends %v, want both pods (pod1 across the overlay)", counts)
	}

	// The server returns, but node2 cannot reach it while a change is made.
	port := strings.TrimPrefix(k.api.URL, "https://"+kubeAPIAddr+":")
	block := []string{"OUTPUT", "-d", kubeAPIAddr, "-p", "tcp", "--dport", port, "-j", "REJECT", "--reject-with", "tcp-reset"}
	kn.node.MustExec(t, append([]string{"iptables", "-I"}, block...)...)
	k.api.Restart(t, kubeSvcRange)
	k.applySvc(t, svcYAML("away"))
	Eventually(t, 15*time.Second, 50*time.Millisecond, "node1 answers away", func() error {
		return digHas(k.n(1), "away", "A", "9.251.")
	})
	if err := digStatus(kn, "away", "NXDOMAIN"); err != nil {
		t.Errorf("node2 cut off from the API server already knows away: %v", err)
	}
	kn.node.MustExec(t, append([]string{"iptables", "-D"}, block...)...)
	took := Eventually(t, 60*time.Second, 100*time.Millisecond, "node2 picks up away", func() error {
		return digHas(kn, "away", "A", "9.251.")
	})
	t.Logf("node2 reconciled %v after it could reach the API server again", took.Round(time.Millisecond))
}

// digHas checks that `dig +short TYPE name.<ns>.svc.cluster.local` from kn has an answer starting
// with want.
func digHas(kn *kubeNode, svc, typ, want string) error {
	name := svc + "." + kubeNS + ".svc.cluster.local"
	out, err := kn.node.Exec("dig", "+short", "+time=1", "+tries=1", "@"+dnsIP, name, typ)
	if err != nil {
		return err
	}
	for line := range strings.Lines(out) {
		if strings.HasPrefix(strings.TrimSpace(line), want) {
			return nil
		}
	}
	return fmt.Errorf("dig %s %s: %q, want an answer starting with %q", name, typ, out, want)
}

// digStatus checks the status of an A query for the service from kn.
func digStatus(kn *kubeNode, svc, status string) error {
	name := svc + "." + kubeNS + ".svc.cluster.local"
	out, err := kn.node.Exec("dig", "+time=1", "+tries=1", "@"+dnsIP, name, "A")
	if err != nil {
		return err
	}
	if !strings.Contains(out, "status: "+status) {
		return fmt.Errorf("dig %s: want status %s:\n%s", name, status, out)
	}
	return nil
}
