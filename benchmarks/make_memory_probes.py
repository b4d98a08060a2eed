"""Write the dialogue-memory probe set, ``belle_edge/data/memory_probes.jsonl`` (fixed seed: the same file on
every run; the file is committed, this script says how it was made).

    .venv/bin/python benchmarks/make_memory_probes.py

Each line is one customer-service dialogue in which the customer states one fact at turn ``fact_turn`` (an
order number, a phone number, an address, a name, a product, a size or a date), then talks of other things for
ten turns; each of those ten turns may instead be the customer asking for the fact back: ``asks[d-1]`` asked
at turn ``fact_turn + d`` is the probe of distance d. Every turn has a reference reply, fed as context (as
``belle-edge eval`` does). 18 Chinese and 6 English dialogues, 10 distances each: 240 probes.
"""
from __future__ import annotations

import json
import os
import random

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "belle_edge", "data",
                   "memory_probes.jsonl")
SEED = 17
DISTANCES = 10
SYSTEM = {"zh": "你是网店的客服助手，回答简洁、礼貌。", "en": "You are a web shop's customer-service assistant. Answer briefly and politely."}

# ordinary turns between the fact and the question: (user, reference reply)
FILLERS = {
    "zh": [
        ("你们一般几天能发货？", "一般下单后48小时内发货，节假日可能顺延一天。"),
        ("支持七天无理由退货吗？", "支持的，商品未使用且包装完好，签收后七天内都可以申请退货。"),
        ("运费怎么算？", "订单满99元包邮，不满99元收取8元运费。"),
        ("可以开发票吗？", "可以开电子发票，在订单详情页点击“申请发票”即可。"),
        ("有优惠券可以用吗？", "现在店铺有满200减20的优惠券，结算时可以领取使用。"),
        ("用的是什么快递？", "默认发顺丰，偏远地区会改发邮政。"),
        ("能货到付款吗？", "抱歉，目前只支持在线支付，暂不支持货到付款。"),
        ("保修期多久？", "整机保修一年，保修期内非人为损坏可以免费维修。"),
        ("退款多久能到账？", "退款审核通过后，一般1到3个工作日原路退回。"),
        ("这个颜色还有货吗？", "目前有货的，库存还比较充足。"),
        ("你们有实体店吗？", "我们只在线上销售，没有实体店。"),
        ("可以加急吗？", "可以备注加急，我们会优先安排打包发货。"),
        ("包装里有说明书吗？", "有的，每件商品都附带中文说明书和保修卡。"),
        ("会员有什么优惠？", "会员每单可以享受95折，生日当月还有额外优惠券。"),
        ("能帮我改一下备注吗？", "可以的，请告诉我新的备注内容，我帮您更新。"),
        ("周末有人值班吗？", "有的，客服每天9点到22点在线，周末也一样。"),
        ("下单后还能改颜色吗？", "发货前可以修改，发货后就需要走退换货流程了。"),
        ("这个商品是正品吗？", "我们是品牌授权店，所有商品都是正品，支持专柜验货。"),
        ("可以分期付款吗？", "支持花呗和信用卡分期，结算页面可以选择分期期数。"),
        ("快递可以放驿站吗？", "可以的，我给快递员备注放驿站，到了会有短信通知。"),
        ("有没有赠品？", "现在下单送一个收纳袋，数量有限，送完即止。"),
        ("价格以后会降吗？", "价格会随活动调整，如果签收后七天内降价可以申请价保。"),
        ("可以开专票吗？", "可以开增值税专用发票，需要提供公司的开票信息。"),
        ("好的，谢谢你。", "不客气，还有什么问题随时联系我。"),
    ],
    "en": [
        ("How long does shipping usually take?", "Orders usually ship within 48 hours and arrive in 3 to 5 days."),
        ("Do you accept returns?", "Yes, unused items in their original packaging can be returned within 7 days."),
        ("How much is delivery?", "Delivery is free over $99; below that it is $8."),
        ("Can I get an invoice?", "Yes, you can request an electronic invoice on the order page."),
        ("Are there any coupons right now?", "There is a $20 off $200 coupon you can claim at checkout."),
        ("Which courier do you use?", "We ship with SF Express by default."),
        ("Can I pay on delivery?", "Sorry, we only accept online payment at the moment."),
        ("How long is the warranty?", "The warranty is one year for any defect that is not accidental damage."),
        ("When will I get my refund?", "Refunds reach your account within 1 to 3 business days after approval."),
        ("Is this colour in stock?", "Yes, it is in stock and there is plenty of it."),
        ("Do you have a physical store?", "No, we only sell online."),
        ("Can you rush my order?", "Yes, I can mark it as urgent so it is packed first."),
        ("Is there a manual in the box?", "Yes, every item comes with a manual and a warranty card."),
        ("Do members get a discount?", "Members get 5% off every order and a birthday coupon."),
        ("Are you open on weekends?", "Yes, support is online from 9 am to 10 pm every day."),
        ("Is the product genuine?", "Yes, we are an authorised store and every item is genuine."),
        ("Thanks for your help.", "You are welcome. Let me know if there is anything else."),
    ],
}

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高"
GIVEN = ["伟", "芳", "娜", "敏", "静", "磊", "洋", "艳", "勇", "军", "杰", "娟", "涛", "明", "超", "秀英", "建华", "晓燕", "志强", "海燕"]
EN_NAMES = ["Emily Carter", "James Wilson", "Olivia Brown", "Daniel Lee", "Sophia Martin", "Lucas Walker"]
CITIES = [("北京市", "朝阳区", "建国路"), ("上海市", "浦东新区", "张江路"), ("广州市", "天河区", "天河北路"),
          ("深圳市", "南山区", "科技园南路"), ("杭州市", "西湖区", "文三路"), ("成都市", "武侯区", "人民南路"),
          ("南京市", "鼓楼区", "中山北路"), ("武汉市", "洪山区", "珞喻路")]
PRODUCTS = ["小米空气净化器4 Pro", "华为MatePad 11平板", "飞利浦电动牙刷HX6730", "戴森V12吸尘器", "美的电饭煲MB-FB40",
            "索尼WH-1000XM5耳机", "九阳豆浆机DJ13B", "罗技MX Master 3鼠标"]
EN_PRODUCTS = ["Kindle Paperwhite", "Anker PowerCore 20000", "Logitech MX Keys", "Philips Hue Go"]
SIZES = ["XL码", "42码", "M码", "175/92A", "38码", "L码"]
EN_SIZES = ["size 42", "size XL", "size M"]
DATES = ["6月18日", "11月11日", "3月8日", "9月20日", "12月24日", "5月1日"]
EN_DATES = ["June 18", "November 11", "March 8"]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _order_number(rng: random.Random) -> str:
    prefix = rng.choice(["JD", "SF", "TB", "DD"])
    return prefix + _digits(rng, rng.choice([10, 12]))


def _address(rng: random.Random) -> str:
    city, district, road = rng.choice(CITIES)
    return f"{city}{district}{road}{rng.randint(1, 299)}号"


# kind -> language -> how to draw the fact
VALUES = {
    "order": {"zh": _order_number, "en": _order_number},
    "phone": {lang: (lambda rng: "1" + rng.choice("3589") + _digits(rng, 9)) for lang in ("zh", "en")},
    "address": {"zh": _address},
    "name": {"zh": lambda rng: rng.choice(SURNAMES) + rng.choice(GIVEN), "en": lambda rng: rng.choice(EN_NAMES)},
    "product": {"zh": lambda rng: rng.choice(PRODUCTS), "en": lambda rng: rng.choice(EN_PRODUCTS)},
    "size": {"zh": lambda rng: rng.choice(SIZES), "en": lambda rng: rng.choice(EN_SIZES)},
    "date": {"zh": lambda rng: rng.choice(DATES), "en": lambda rng: rng.choice(EN_DATES)},
}
# kind -> language -> (the customer's message stating {fact}, the reference reply, the ways to ask for it back)
TEMPLATES = {
    "order": {
        "zh": ("你好，我的订单号是{fact}，想问一下发货了没有？", "您好，已查到订单{fact}，正在打包，今天会发出。",
               ["我刚才说的订单号是多少？", "麻烦再报一下我的订单号。", "我的订单号是什么来着？"]),
        "en": ("Hi, my order number is {fact}. Has it shipped yet?",
               "Thanks, I found order {fact}. It is being packed and will ship today.",
               ["What was my order number again?", "Can you repeat my order number?", "Which order number did I give you?"])},
    "phone": {
        "zh": ("到货的时候请打我电话{fact}。", "好的，已备注联系电话{fact}，到货后快递员会联系您。",
               ["我留的电话号码是多少？", "快递员会打哪个号码？", "麻烦确认一下我的手机号。"]),
        "en": ("Please call me at {fact} when the parcel arrives.", "Noted, the courier will call {fact} on arrival.",
               ["What phone number did I give you?", "Can you read my phone number back to me?",
                "Which number will the courier call?"])},
    "address": {
        "zh": ("收货地址改成{fact}，麻烦帮我改一下。", "好的，收货地址已改为{fact}。",
               ["我的收货地址是哪里？", "麻烦确认一下我刚才给的地址。", "包裹会寄到哪个地址？"])},
    "name": {
        "zh": ("我叫{fact}，订单是用这个名字下的。", "{fact}您好，已找到您的账户。",
               ["我叫什么名字？", "订单上的收货人是谁？", "你还记得我的名字吗？"]),
        "en": ("The order is under the name {fact}.", "Thank you, {fact}. I have found your account.",
               ["What name is the order under?", "Do you remember my name?", "Whose name did I give for the order?"])},
    "product": {
        "zh": ("我上周买的{fact}开不了机了。", "很抱歉给您带来不便，我们来处理一下您的{fact}。",
               ["我说的是哪个商品？", "我买的是什么产品？", "出问题的是哪件商品？"]),
        "en": ("I bought a {fact} last week and it will not turn on.", "Sorry to hear that. Let us sort out your {fact}.",
               ["Which product did I say I bought?", "What item was I asking about?", "Remind me which product is broken."])},
    "size": {
        "zh": ("这件衣服我要换成{fact}。", "好的，帮您登记换成{fact}。",
               ["我要换的是什么尺码？", "我刚才说换哪个码？", "麻烦确认一下我要的尺码。"]),
        "en": ("Please exchange my shoes for {fact}.", "Sure, I will exchange them for {fact}.",
               ["Which size did I ask for?", "What size am I exchanging to?", "Remind me of the size I wanted."])},
    "date": {
        "zh": ("请在{fact}送到，别提前。", "好的，已约定{fact}配送。",
               ["我希望哪天送到？", "我约的送货日期是哪天？", "麻烦确认一下配送日期。"]),
        "en": ("Please deliver it on {fact}, not before.", "Got it, delivery is scheduled for {fact}.",
               ["Which day did I want it delivered?", "What delivery date did I ask for?",
                "When should it arrive, as I asked?"])},
}


def _fact(rng: random.Random, kind: str, lang: str) -> tuple[str, str, str, list[str]]:
    """(the fact, the customer's message stating it, the reference reply, the ways to ask for it back)."""
    fact = VALUES[kind][lang](rng)
    statement, reply, asks = TEMPLATES[kind][lang]
    return fact, statement.format(fact=fact), reply.format(fact=fact), asks


def dialogues() -> list[dict]:
    rng = random.Random(SEED)
    kinds = {"zh": ["order", "phone", "address", "name", "product", "size", "date"] * 3, "en": ["order", "phone", "name", "product", "size", "date"]}
    kinds["zh"] = kinds["zh"][:18]
    out = []
    for lang in ("zh", "en"):
        for i, kind in enumerate(kinds[lang]):
            fact, statement, reply, asks = _fact(rng, kind, lang)
            fillers = rng.sample(FILLERS[lang], DISTANCES)
            greeting = [("你好，在吗？", "您好，在的，请问有什么可以帮您？") if lang == "zh"
                        else ("Hello, is anyone there?", "Hello! How can I help you today?")]
            before = greeting if i % 2 else []  # half state the fact at turn 1, half at turn 2
            turns = before + [(statement, reply)] + fillers
            out.append({"id": f"{lang}-{kind}-{i + 1:02d}", "lang": lang, "kind": kind, "fact": fact,
                        "system": SYSTEM[lang], "fact_turn": len(before) + 1,
                        "turns": [{"user": u, "reply": r} for u, r in turns],
                        "asks": [asks[d % len(asks)] for d in range(DISTANCES)]})
    return out


def main() -> None:
    items = dialogues()
    with open(OUT, "w", encoding="utf-8") as f:
        for d in items:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(items)} dialogues, {len(items) * DISTANCES} probes")


if __name__ == "__main__":
    main()
